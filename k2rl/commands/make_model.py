"""k2rl make-model --preset NAME --out DIR [--seed N] [--device cpu|cuda]"""
from __future__ import annotations

from k2rl.model.presets import PRESETS

NAME = "make-model"
HELP = "write a random-initialised K2-architecture model + tokenizer in the HF checkpoint layout"


def add_arguments(parser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="same seed (and kind of device), same bytes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where to initialise (default: "
                        "the GPU when there is one)")


def run(args) -> int:
    from k2rl.model.build import make_model

    out = make_model(args.preset, args.out, seed=args.seed, device=args.device)
    print(f"wrote {args.preset} model and tokenizer to {out}")
    return 0
