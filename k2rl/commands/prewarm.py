"""k2rl prewarm CONFIG [--set key=value ...]

A fresh machine's first rollout-engine start is mostly compiling: torch.compile and the fused MoE's
Triton kernels, 34-45 s and ~85 kernels of k2-mini's 110 s cold start on an H100 (README,
"Benchmarks"). This starts the job's rollout engine once, from the model's config and tokenizer alone
with vLLM's random weights, so that the compiled graphs and kernels are in the caches before the job
starts (`rollout.compile_cache_dir`, or this machine's defaults). Any checkpoint of the same
architecture then finds them: the engine keys them by the config alone (k2rl.engines.compile_key).
Run it beside an SFT stage whose output the RL job starts from (`scripts/demo.py --gpu` does), or
once per cluster on storage every node mounts.
"""
from __future__ import annotations

from k2rl.commands import add_set_argument
from k2rl.validation import ValidationFailed

NAME = "prewarm"
HELP = "compile a job's rollout engine ahead of the job, from the model's config alone (no weights needed)"

# The warm-up engine holds random weights and next to no KV cache: neither is in vLLM's compile key, and
# beside a training process on the same GPU it takes little of the memory (vLLM checks the free memory
# against gpu_memory_utilization at start).
WARM_UP_MEMORY = {"kv_cache_memory_bytes": 256 << 20, "gpu_memory_utilization": 0.1}


def add_arguments(parser) -> None:
    parser.add_argument("config", help="the job YAML whose rollout engine to compile (its model and rollout sections)")
    add_set_argument(parser)


def run(args) -> int:
    import tempfile
    import time

    from k2rl.config import load_config
    from k2rl.engines.rollout import RolloutEngine
    from k2rl.loop.launch import given_model
    from k2rl.model.build import write_model_files

    job = load_config(args.config, args.overrides)
    if job.rollout.tensor_parallel_size > 1:
        raise ValidationFailed("k2rl prewarm starts one engine rank: set rollout.tensor_parallel_size=1 (a "
                               "tensor-parallel engine compiles on its first start in the job)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="k2rl-prewarm-") as scratch:
        # the preset's config and tokenizer as `k2rl train` builds them (the same seed): what vLLM compiles
        model_dir = given_model(job) or write_model_files(job.model.preset, scratch, seed=job.model.init_seed)
        RolloutEngine.from_config(model_dir, job.rollout.model_copy(update=WARM_UP_MEMORY), job.model, job.run.seed,
                                  weights=False)
    print(f"k2rl prewarm: compiled the rollout engine of {job.model.path or job.model.preset} in "
          f"{time.perf_counter() - start:.0f} s, cached in {job.rollout.compile_cache_dir or 'the default caches'}")
    return 0
