"""k2rl synth CONFIG [--set key=value ...]"""
from __future__ import annotations

from k2rl.commands import add_set_argument

NAME = "synth"
HELP = "grow tool-use data from domain descriptions: tools, agents, tasks with rubrics, simulated and judged trajectories"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="synthesis config YAML (see configs/synth-example.yaml)")
    add_set_argument(parser, "agents.count=50")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")


def run(args) -> int:
    from k2rl.synth.config import load_synth_config
    from k2rl.synth.pipeline import run_pipeline
    from k2rl.synth.report import summary_lines

    overrides = [*args.overrides, *(["progress=false"] if args.no_progress else [])]
    config = load_synth_config(args.config, overrides)
    report = run_pipeline(config)
    print("\n".join(summary_lines(report)))
    print(f"outputs in {config.out_path}: sft.jsonl, task_pool.jsonl, tools.jsonl, report.json")
    return 0
