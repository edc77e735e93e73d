"""The CPU demo: a small K2-architecture model learns the `shop` tools. SFT cold start on the scripted
oracle's dialogs, then RL with K2's objective on 2 colocated workers; greedy held-out evaluation split
by task kind, beside the model-free baselines on the same tasks.

    python scripts/demo.py [--seed N] [--sft-steps N] [--rl-steps N] [--eval-tasks N] [--out DIR]
    python scripts/demo.py --gpu      # k2-mini on one GPU: configs/gpu-demo-sft.yaml, configs/gpu-demo-rl.yaml

Runs land in OUT/demo-sft-sSEED and OUT/demo-rl-sSEED (metrics.jsonl, plots/, rollouts/ with the
held-out dialogs as eval_step_N.jsonl, checkpoints/); the summary table goes to OUT/demo-sSEED.json.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from k2rl.loop.run_dir import RunDir

CONFIGS = {"cpu": ("configs/demo-sft.yaml", "configs/tiny-cpu.yaml"),
           "gpu": ("configs/gpu-demo-sft.yaml", "configs/gpu-demo-rl.yaml")}
ROWS = [("success on action tasks", "success_action"), ("wrong refusals (action tasks)", "wrong_refusal"),
        ("success on refuse tasks", "success_refuse"), ("success overall", "success"),
        ("tool calls per episode", "tool_calls"), ("valid tool calls", "tool_call_validity"),
        ("expected reward per task", "reward")]


def train(config: str, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "k2rl.cli", "train", config, *[a for o in overrides for a in ("--set", o)]]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def columns(metrics: list[dict]) -> dict[str, dict[str, float]]:
    """Per-kind figures of the SFT start (RL step 0), after RL (the last eval) and the baselines."""
    evals = [row for row in metrics if "eval/success" in row]
    pick = lambda row, prefix: {key: row[f"{prefix}/{key}"] for _, key in ROWS if f"{prefix}/{key}" in row}
    out = {"SFT start": pick(evals[0], "eval"), "after RL": pick(evals[-1], "eval")}
    for name in ("refuse", "nothing", "oracle"):
        out[f"baseline: {name}"] = pick(evals[0], f"baseline/{name}")
    return out


def print_table(table: dict[str, dict[str, float]], tasks: int) -> None:
    names = list(table)
    print(f"\nheld-out greedy evaluation, {tasks} shop tasks never trained on")
    print(f"{'':32}" + "".join(f"{n:>18}" for n in names))
    for label, key in ROWS:
        cells = [table[n].get(key) for n in names]
        fmt = (lambda v: f"{v:18.2f}") if key in ("tool_calls", "reward") else (lambda v: f"{v:18.1%}")
        print(f"{label:32}" + "".join(fmt(v) if v is not None else f"{'-':>18}" for v in cells))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0, help="model init and sampling seed (the tasks stay the same)")
    parser.add_argument("--gpu", action="store_true", help="the GPU demo's configs (k2-mini, one GPU)")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: the SFT config's")
    parser.add_argument("--rl-steps", type=int, default=None, help="default: the RL config's")
    parser.add_argument("--eval-tasks", type=int, default=200)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args()
    start = time.time()
    sft, rl = f"demo-sft-s{args.seed}", f"demo-rl-s{args.seed}"
    for name in (sft, rl):
        shutil.rmtree(Path(args.out) / name, ignore_errors=True)

    sft_config, rl_config = CONFIGS["gpu" if args.gpu else "cpu"]
    common = [f"run.output_dir={args.out}", f"run.seed={args.seed}", f"model.init_seed={args.seed}"]
    sft_steps = [f"schedule.steps={args.sft_steps}"] if args.sft_steps else []
    train(sft_config, *common, f"run.name={sft}", *sft_steps)
    sft_model = RunDir(Path(args.out) / sft).latest() / "model"
    rl_steps = [f"schedule.steps={args.rl_steps}"] if args.rl_steps else []
    train(rl_config, *common, f"run.name={rl}", f"model.path={sft_model}", *rl_steps,
          f"env.eval_tasks={args.eval_tasks}")

    metrics = [json.loads(line) for line in (Path(args.out) / rl / "metrics.jsonl").read_text().splitlines()]
    table = columns(metrics)
    print_table(table, args.eval_tasks)
    minutes = (time.time() - start) / 60
    summary = {"seed": args.seed, "minutes": round(minutes, 1), "eval_tasks": args.eval_tasks, "table": table}
    (Path(args.out) / f"demo-s{args.seed}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo took {minutes:.1f} min; plots in {Path(args.out) / rl / 'plots'}; held-out dialogs in "
          f"{Path(args.out) / rl / 'rollouts'}/eval_step_*.jsonl")


if __name__ == "__main__":
    main()
