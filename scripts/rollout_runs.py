"""The rollout goal's row over several runs of `bench_gpu_step.py --rollout-only` (`gpu_check.sh rollout`).

Why: within one run the Worker and plain vLLM take turns, so a slow host slows both alike; yet the
median of one run's pairs was 0.90, 0.85, 0.89 and 1.005 in four runs on H100s (2026-12-07, the
last two with the same rollout code). Whether the goal holds is a question about the runs, so this
prints each run's median beside the others and how many reach the goal; then each run's best
generate against plain vLLM's best, whose ratio a slow stretch moves only where it lasts through all
of one side's turns (the medians of seven runs were 0.79-1.007 and their best-generate ratios
0.88-1.004, 2026-12-07); then the median of every pair of the runs pooled (runs since 2026-12-07
15:20 write their pairs), which one slow stretch of the host moves less than the median of one run's seven.
    python scripts/rollout_runs.py LOG_DIR/rollout-*.json [--goal 0.9]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

RATIO = "rollout/vs_standalone_vllm"
WORKER_BEST = "rollout/tokens_per_s_beside_standalone_vllm"
PLAIN_BEST = "baseline/standalone_vllm_tokens_per_s"


def measured_runs(paths: list[str]) -> list[tuple[str, dict]]:
    """(path, figures) of each run that measured the ratio; a run that did not (no figures written, or
    stopped before its pairs) is named on stderr."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                figures = json.load(f)
        except FileNotFoundError:
            figures = {}
        if RATIO in figures:
            runs.append((path, figures))
        else:
            print(f"{path}: no {RATIO} (the run stopped before its pairs; see its .log)", file=sys.stderr)
    return runs


def spread(ratios: list[float], goal: float) -> str:
    """The median, the lowest and the highest of `ratios`, and how many reach `goal`."""
    return (f"median {statistics.median(ratios):.4f}, lowest {min(ratios):.4f}, highest {max(ratios):.4f}; "
            f"{sum(r >= goal for r in ratios)} of {len(ratios)} at or above {goal}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="the --json files of bench_gpu_step.py --rollout-only runs")
    ap.add_argument("--goal", type=float, default=0.9, help="the Worker's tokens/s over plain vLLM's")
    args = ap.parse_args()
    runs = measured_runs(args.runs)
    if not runs:
        print("no run measured the Worker against plain vLLM", file=sys.stderr)
        return 1
    for path, f in runs:
        print(f"{path}: the Worker {f[RATIO]:.4f} of plain vLLM (pairs {f[RATIO + '_lowest']:.3f}-"
              f"{f[RATIO + '_highest']:.3f}; best {f[WORKER_BEST]:.0f} vs {f[PLAIN_BEST]:.0f} tokens/s)")
    print(f"{len(runs)} runs' medians: {spread([f[RATIO] for _, f in runs], args.goal)}")
    print(f"best generate against best generate: {spread([f[WORKER_BEST] / f[PLAIN_BEST] for _, f in runs], args.goal)}")
    pooled = [ratio for _, f in runs for ratio in f.get(RATIO + "_pairs", [])]
    if pooled:
        with_pairs = sum(RATIO + "_pairs" in f for _, f in runs)
        print(f"{len(pooled)} pairs of {with_pairs} run(s) pooled: {spread(pooled, args.goal)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
