"""k2rl train CONFIG [--set key=value ...] [--resume RUN_DIR]"""
from __future__ import annotations

from k2rl.commands import add_set_argument

NAME = "train"
HELP = "run an RL (or SFT) job from a YAML config on colocated vLLM + DeepSpeed workers"


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="job YAML (default: built-in defaults = configs/tiny-cpu.yaml)")
    add_set_argument(parser)
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a run from its latest checkpoint (its config.yaml, plus --set overrides)")


def run(args) -> int:
    from pathlib import Path

    from k2rl.config import load_config
    from k2rl.loop.launch import train

    if args.resume:
        config_path = Path(args.resume) / "config.yaml"
        config = load_config(config_path, args.overrides)
        final = train(config, resume_dir=Path(args.resume))
    else:
        final = train(load_config(args.config, args.overrides))
    print(f"k2rl train: last checkpoint {final} (continue a run with --resume RUN_DIR)")
    return 0
