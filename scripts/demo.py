"""The CPU demo: k2-tiny learns shop tasks. SFT cold start on oracle demonstrations, then RL with K2's
objective on 2 colocated workers, with held-out success measured before and after RL.

    python scripts/demo.py [--sft-steps N] [--rl-steps N] [--eval-tasks N]

Runs land in runs/demo-sft and runs/demo-rl (metrics.jsonl, plots/, checkpoints/).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def train(config: str, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "k2rl.cli", "train", config, *[a for o in overrides for a in ("--set", o)]]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--rl-steps", type=int, default=30)
    parser.add_argument("--eval-tasks", type=int, default=200)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args()
    start = time.time()
    for name in ("demo-sft", "demo-rl"):
        shutil.rmtree(Path(args.out) / name, ignore_errors=True)

    train("configs/demo-sft.yaml", f"run.output_dir={args.out}", f"schedule.steps={args.sft_steps}",
          f"schedule.checkpoint_every={args.sft_steps}")
    sft_model = Path(args.out) / "demo-sft" / "checkpoints" / f"step_{args.sft_steps}" / "model"
    train("configs/tiny-cpu.yaml", f"run.output_dir={args.out}", "run.name=demo-rl", f"model.path={sft_model}",
          f"schedule.steps={args.rl_steps}", f"schedule.eval_every={args.rl_steps}", f"env.eval_tasks={args.eval_tasks}")

    rows = [json.loads(line) for line in (Path(args.out) / "demo-rl" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/success"]) for r in rows if "eval/success" in r]
    (_, before), (_, after) = evals[0], evals[-1]
    print(f"\nheld-out success on {args.eval_tasks} shop tasks (greedy): after SFT {before:.1%} -> after RL {after:.1%} "
          f"({(after - before) * 100:+.1f} points); demo took {(time.time() - start) / 60:.1f} min")
    print(f"plots: {Path(args.out) / 'demo-rl' / 'plots'}")


if __name__ == "__main__":
    main()
