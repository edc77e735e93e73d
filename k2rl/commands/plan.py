"""k2rl plan --preset NAME --gpus N --zero S --tp T [--expert-parallel] [--no-offload] [--gpu h200|80gb]"""
from __future__ import annotations

from k2rl.model.presets import PRESETS

NAME = "plan"
HELP = "parameter counts, per-GPU memory in TRAIN and ROLLOUT, the fewest GPUs that fit, and weight-sync bytes"


def add_arguments(parser) -> None:
    from k2rl.model.plan import GPU_GIB

    parser.add_argument("--preset", default="k2", choices=sorted(PRESETS))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3], help="train.zero_stage")
    parser.add_argument("--optimizer", default="muonclip", choices=["muonclip", "adamw"])
    parser.add_argument("--tp", type=int, default=1, help="rollout.tensor_parallel_size (GPUs per vLLM engine)")
    parser.add_argument("--expert-parallel", action="store_true", help="rollout.expert_parallel")
    parser.add_argument("--no-offload", dest="offload", action="store_false",
                        help="train.offload none: the trainer's state stays on the GPU during rollout")
    parser.add_argument("--gpu", default="h200", choices=sorted(GPU_GIB))
    parser.add_argument("--micro-batch-tokens", type=int, default=4096, help="train.micro_batch_tokens")
    parser.add_argument("--no-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--kv-tokens", type=int, default=65536, help="tokens of KV cache per engine")
    parser.add_argument("--rollout-dtype", default="bf16", choices=["bf16", "fp8"])


def run(args) -> int:
    from transformers import DeepseekV3Config

    from k2rl.model.plan import GPU_GIB, Layout, count_parameters, plan_layout, smallest_gpus, smallest_tp
    from k2rl.model.presets import preset_config

    config = DeepseekV3Config(**preset_config(args.preset))
    counts = count_parameters(config)
    layout = Layout(args.gpus, args.zero, args.optimizer, args.tp, args.expert_parallel, args.offload,
                    args.micro_batch_tokens, args.gradient_checkpointing, args.kv_tokens,
                    1 if args.rollout_dtype == "fp8" else 2)
    capacity = GPU_GIB[args.gpu]
    try:
        p = plan_layout(config, counts, layout)
    except ValueError as e:
        print(f"k2rl plan: {e}")
        return 2
    print(f"{args.preset}: {counts.total / 1e9:.2f} B parameters, {counts.active / 1e9:.2f} B active per token "
          f"({counts.experts / counts.total:.0%} in routed experts, {counts.muon / counts.total:.1%} in Muon matrices)")
    print(f"{args.gpus} x {args.gpu} ({capacity:.1f} GiB), ZeRO-{args.zero}, {args.optimizer}, rollout TP {args.tp}"
          f"{' + EP' if args.expert_parallel else ''} in {args.rollout_dtype}, trainer offload "
          f"{'on' if args.offload else 'off'}; per GPU:")
    for phase, parts, total in (("TRAIN", p.train, p.train_gib), ("ROLLOUT", p.rollout, p.rollout_gib)):
        detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        verdict = "fits" if total <= capacity else f"does NOT fit ({total - capacity:.1f} GiB over)"
        print(f"  {phase:8s}{total:8.1f} GiB  {verdict}  ({detail})")
    print(f"  weight sync: {p.sync_gib:.1f} GiB into each engine rank (its TP shard)"
          + (f", after ZeRO-3 gathers of {p.gather_gib:.1f} GiB per GPU" if p.gather_gib else ""))
    if args.offload:
        print(f"  host memory for the offloaded trainer: {p.host_gib:.1f} GiB pinned per GPU")
    fewest = smallest_gpus(config, counts, layout, capacity)
    tp = smallest_tp(config, counts, layout, capacity)
    why = ("" if fewest else f" (ROLLOUT needs more than TP {args.tp})" if p.rollout_gib > capacity
           else " (TRAIN fits at no N: ZeRO 0-2 keep whole weights on every GPU; activations do not shrink with N)")
    print(f"smallest N that fits with this layout: {fewest or 'none'}{why}")
    print(f"smallest rollout TP whose ROLLOUT phase fits: {tp if tp else 'none up to 64'}")
    return 0
