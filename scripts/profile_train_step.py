"""Where a trainer step's GPU time goes (a diagnostic; figures to compare belong to bench_gpu_step.py).

Times one TrainEngine step on a random batch with gradient checkpointing on and off, the forward alone,
and both again without the QK-Clip max-logit pass; then torch.profiler's top kernels of one step.

    python scripts/profile_train_step.py [--config configs/k2-mini-1gpu.yaml] [--set KEY=VALUE ...]

It found Newton-Schulz running in fp32 on the H200 (MuonClip 496 of a 903 ms k2-mini step, fixed).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cuda")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import k2rl.model.attention as attention  # noqa: E402
from k2rl.commands import add_set_argument  # noqa: E402
from k2rl.config import AlgorithmConfig, load_config  # noqa: E402
from k2rl.engines.train import TrainEngine  # noqa: E402
from k2rl.engines.types import TokenBatch  # noqa: E402
from k2rl.engines.world import single_rank_world  # noqa: E402
from k2rl.loop.objective import Objective  # noqa: E402
from k2rl.model.build import make_model  # noqa: E402


def seconds_per_call(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/k2-mini-1gpu.yaml")
    add_set_argument(parser)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    job = load_config(args.config, args.overrides)
    single_rank_world()
    model_dir = make_model(job.model.preset, tempfile.mkdtemp(prefix="profile-train-"), seed=0)
    engine = TrainEngine(model_dir, job)
    vocab = engine.model.config.vocab_size
    batch = TokenBatch.from_lists(torch.randint(20, vocab, (args.seqs, args.seq_len),
                                                generator=torch.Generator().manual_seed(0)).tolist())
    on_device = batch.to(engine.device)
    nll = Objective(AlgorithmConfig(name="sft"))  # next-token loss on every token
    step = lambda: engine.train_step(batch, nll)  # noqa: E731

    def forward():
        engine.engine.train()  # training mode: the max-logit pass runs
        with torch.no_grad():
            engine._forward_logprobs(on_device)

    timings = {}
    engine.model.gradient_checkpointing_enable()
    timings["step, gradient checkpointing"] = seconds_per_call(step)
    engine.model.gradient_checkpointing_disable()
    timings["step, no checkpointing"] = seconds_per_call(step)
    timings["forward"] = seconds_per_call(forward)
    recorder = attention.causal_head_max
    attention.causal_head_max = lambda query, key, mask, scaling: torch.zeros(query.shape[1], device=query.device)
    timings["step, no checkpointing, no max-logit pass"] = seconds_per_call(step)
    timings["forward, no max-logit pass"] = seconds_per_call(forward)
    attention.causal_head_max = recorder
    tokens = args.seqs * args.seq_len
    print(f"{tokens} tokens a step; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
          f"Newton-Schulz in {engine.client_optimizer.ns_dtype}")
    for name, seconds in timings.items():
        print(f"{name:44} {seconds * 1e3:8.1f} ms  {tokens / seconds / 1e3:6.1f}k tokens/s")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))
    # Which tensors the copies and casts move (a cast is aten::copy_ under aten::_to_copy)
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=40,
                         max_shapes_column_width=90))


if __name__ == "__main__":
    main()
