"""The scheduler's host time a decode step with routing replay, stock and as the RolloutEngine patches it
(issue 12: the rollout is host-bound, so what the scheduler does per request and step is the step's).

vLLM 0.26's scheduler (async, as the engine runs it) takes `--requests` requests of `--prompt-len` prompt
and `--new-tokens` generated tokens, all running at once, from a stand-in model runner
(scripts/scheduler_stand_in.py: no model, no GPU; the scheduler's own calls are timed, `schedule` and
`update_from_output`), three ways:
- no replay (plain vLLM's scheduler, the baseline);
- stock replay (a block-id copy, a slice of the step's routing per request and step);
- replay read at finish (`k2rl.engines.routing_at_finish`: each request's routing read once as it ends).
Each `--rounds` times, in turn (the order rotating), on a fresh scheduler; figures are the median round's
microseconds a step and ratios against no replay in the same run. Not counted: the output processor's
list append per request and step that stock replay also makes (the patch makes one per request), and
the model runner's per-step copies, which both make.

Runs where vLLM 0.26 is importable: on the device from the site (`. /tmp/site/env.sh`), or on any
machine from its Python sources (`PYTHONPATH=DIR_WITH_VLLM_0.26:.`; the scheduler is pure Python):
    python scripts/bench_routing_host.py [--requests 256] [--prompt-len 64] [--new-tokens 256] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import numpy as np
from scheduler_stand_in import BLOCK, drive, make_scheduler

from k2rl.engines.routing_at_finish import PATCHED_METHODS, patch_routing_at_finish, reads_routing_per_step
from k2rl.model.presets import preset_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256, help="bench_gpu_step.py's 256 prompts")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preset", default="k2-mini", help="the model config the scheduler sizes its routing by")
    args = ap.parse_args()
    from vllm import __version__
    from vllm.v1.core.sched.scheduler import Scheduler

    if not reads_routing_per_step(Scheduler):
        sys.exit(f"vLLM {__version__}'s scheduler does not slice routing per step: nothing to compare "
                 "(the patch is for vLLM 0.26)")
    stock = {name: getattr(Scheduler, name) for name in PATCHED_METHODS}
    with tempfile.TemporaryDirectory() as model_dir:
        from transformers import DeepseekV3Config

        config = DeepseekV3Config(**preset_config(args.preset))
        config.save_pretrained(model_dir)  # the config alone: what the scheduler's ModelConfig reads
        rng = np.random.default_rng(0)
        tokens = args.requests * (args.prompt_len + args.new_tokens)
        pool = rng.integers(config.n_routed_experts, size=(min(tokens, 8192), config.num_hidden_layers,
                                                            config.num_experts_per_tok), dtype=np.int32)
        prompts = [rng.integers(5, config.vocab_size, args.prompt_len).tolist() for _ in range(args.requests)]

        def run(way: str) -> float:
            for name, method in stock.items():
                setattr(Scheduler, name, method)
            if way == "read_at_finish":
                patch_routing_at_finish()
            scheduler = make_scheduler(model_dir, max_running=args.requests, max_batched_tokens=8192,
                                       num_blocks=2 * tokens // BLOCK + args.requests,
                                       max_model_len=args.prompt_len + args.new_tokens, replay=way != "no_replay")
            result = drive(scheduler, prompts, [args.new_tokens] * args.requests,
                           None if way == "no_replay" else lambda spans: pool[:sum(c for *_, c in spans)])
            return 1e6 * result.scheduler_seconds / result.steps

        ways = ["no_replay", "stock_replay", "read_at_finish"]
        micros = {way: [] for way in ways}
        for round_ in range(args.rounds):
            for way in ways[round_ % len(ways):] + ways[:round_ % len(ways)]:
                micros[way].append(run(way))
        for name, method in stock.items():
            setattr(Scheduler, name, method)
    print(f"vLLM {__version__}: {args.requests} requests x ({args.prompt_len} prompt + {args.new_tokens} new) "
          f"tokens, {args.preset}'s routing, {args.rounds} rounds")
    base = statistics.median(micros["no_replay"])
    for way in ways:
        value = statistics.median(micros[way])
        print(f"{way:<16} scheduler {value:8.1f} us/step  ({value / base:.3f} of no replay; rounds "
              + " ".join(f"{v:.0f}" for v in micros[way]) + ")")
    saved = statistics.median(micros["stock_replay"]) - statistics.median(micros["read_at_finish"])
    print(f"read at finish saves {saved:.1f} us/step, {saved / args.requests:.2f} us per request and step")


if __name__ == "__main__":
    main()
