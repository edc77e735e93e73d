"""k2rl plan --preset NAME --gpus N --zero S"""
from __future__ import annotations

from k2rl.model.presets import PRESETS

NAME = "plan"
HELP = "parameter counts and training memory per GPU for a model preset"


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="k2", choices=sorted(PRESETS))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--optimizer", default="muonclip", choices=["muonclip", "adamw"])


def run(args) -> int:
    from k2rl.model.plan import plan

    p = plan(args.preset, args.gpus, args.zero, args.optimizer)
    print(f"{args.preset}: {p.total / 1e9:.2f} B parameters, {p.active / 1e9:.2f} B active per token "
          f"({p.experts / p.total:.0%} in routed experts)")
    print(f"ZeRO-{args.zero} on {args.gpus} GPUs, bf16 weights/grads + fp32 {args.optimizer} state, per GPU: "
          f"weights {p.weights_gib:.1f} GiB, grads {p.grads_gib:.1f} GiB, optimizer {p.optimizer_gib:.1f} GiB, "
          f"total {p.per_gpu_gib:.1f} GiB (before activations)")
    return 0
