"""The host's share of one decode step's sampling noise, per way of drawing it (issue 12: the rollout is
host-bound, so each microsecond the host spends per step is a microsecond of the step).

For `--rows` requests over a `--vocab`-wide distribution, timed over `--steps` steps:
- unseeded: one `exponential_` for the whole batch (plain vLLM's requests, as a user sends them);
- batched seeds: k2rl's draw table (each request's seed and draw count, from its `DrawLedger`) and one
  Triton kernel (`k2rl.engines.seeded_sampling`, what the RolloutEngine patches into vLLM), the rows
  decoding (their draws stand: the ledger reads and moves no generator offset);
- the table alone: the ledger's loop over the generators, pinned and copied (its part of the above);
- stock seeds: one `exponential_` per request with its own generator (vLLM's own way).
Host microseconds a step (the launches return before the GPU is done: what the loop pays), then the
same with the GPU finishing each step (what a step costs where the host waits for it). Figures are
ratios against unseeded in the same run. CUDA only (a CPU generator keeps no offset).

    python scripts/bench_seeded_sampling.py [--rows 256] [--vocab N (k2-mini's)] [--steps 256]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from k2rl.engines.seeded_sampling import draw_table, exponential_rows
from k2rl.model.presets import preset_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="requests sampled together (bench_gpu_step.py's 256 prompts)")
    ap.add_argument("--vocab", type=int, default=preset_config("k2-mini")["vocab_size"], help="k2-mini's by default")
    ap.add_argument("--steps", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_seeded_sampling.py needs a CUDA GPU: a CPU generator keeps no offset to count draws by")
    q = torch.empty(args.rows, args.vocab, device="cuda")
    generators = {row: torch.Generator(device="cuda").manual_seed(1000 + row) for row in range(args.rows)}
    ways = {
        "unseeded": lambda: q.exponential_(),
        "batched_seeds": lambda: exponential_rows(q, *draw_table(generators, q.device)),
        "table_alone": lambda: draw_table(generators, q.device),
        "stock_seeds": lambda: [q[row].exponential_(generator=g) for row, g in generators.items()],
    }
    figures = {}
    for name, draw in ways.items():
        draw()  # warm-up: the Triton kernel compiles, the pinned-memory cache fills
        figures[f"{name}/host_us_per_step"] = per_step_us(draw, args.steps, wait_each_step=False)
        figures[f"{name}/synced_us_per_step"] = per_step_us(draw, args.steps, wait_each_step=True)
    for name in ways:
        for kind in ("host", "synced"):
            figures[f"{name}/{kind}_vs_unseeded"] = (figures[f"{name}/{kind}_us_per_step"]
                                                    / figures[f"unseeded/{kind}_us_per_step"])
    print(f"{args.rows} rows x {args.vocab} vocabulary, {args.steps} steps, {torch.cuda.get_device_name()}")
    for key, value in figures.items():
        print(f"{key:<40} {value:.4g}")


def per_step_us(draw, steps: int, wait_each_step: bool) -> float:
    """Microseconds a step: the host's own time (no wait inside the loop) or each step until the GPU is done."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        draw()
        if wait_each_step:
            torch.cuda.synchronize()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / steps * 1e6


if __name__ == "__main__":
    main()
