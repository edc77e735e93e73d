"""How long the rollout engine's vLLM takes to start on a fresh machine, and what dominates (issue 12).

Two starts of the RolloutEngine (the config's settings, CUDA graphs unless --eager), each in a process
of its own, with vLLM's, Inductor's and Triton's caches pointed at one new directory: the first as on
a fresh machine, the second with those caches warm. For each: the seconds to a ready engine (vLLM's
import included), vLLM's own account of its parts (weights, torch.compile, profiling run, graph
capture, engine init), and the kernels compiled, by name (vLLM's fused MoE and attention kernels vs
Inductor's, in Triton; FlashInfer's modules, with nvcc).

    python scripts/bench_vllm_start.py [--config configs/k2-mini-1gpu.yaml] [--model-dir DIR] [--eager] [--set KEY=VALUE]

`--inspect-in-subprocess` starts the engine as vLLM would by itself, inspecting the model class in a
fresh Python subprocess (RolloutEngine registers it in-process: `register_model_class_in_process`);
"architecture resolved after" in each start's account is what that costs.

`--prewarm` adds a third start, in caches of its own that `k2rl prewarm` filled first from the same
job config (random weights): what a job's first start pays after a prewarm, against the cold one.

On a CPU it runs as a smoke test (k2-tiny, fp32; vLLM-CPU compiles no Triton kernels):
python scripts/bench_vllm_start.py --preset k2-tiny
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from bench_gpu_step import job_config, model_arguments, model_argv, vllm_start_lines  # noqa: E402

from k2rl.engines.rollout import COMPILE_CACHES  # noqa: E402

# vLLM moves Triton's and Inductor's caches under its own once it compiles; the others (FlashInfer's JIT
# modules under FLASHINFER_WORKSPACE_BASE/.cache, CUDA's PTX cache) are redirected too, so the first
# start is a fresh machine's.
CACHE_VARIABLES = {**COMPILE_CACHES, "XDG_CACHE_HOME": "xdg", "CUDA_CACHE_PATH": "cuda",
                   "FLASHINFER_WORKSPACE_BASE": "flashinfer"}


def start_engine(args) -> None:
    """The child: start the engine, say how long it took."""
    from k2rl.engines.rollout import RolloutEngine

    job = job_config(args)
    if args.inspect_in_subprocess:
        import k2rl.engines.rollout

        k2rl.engines.rollout.register_model_class_in_process = lambda: None
    start = time.perf_counter()
    RolloutEngine.from_config(args.model_dir, job.rollout, job.model, job.run.seed)
    print(json.dumps({"start_s": time.perf_counter() - start}), flush=True)


def compiled_kernels(cache: Path) -> collections.Counter:
    """Kernels compiled into the cache directory, by name: Triton's (one cubin per compile) and the CUDA
    modules FlashInfer builds with nvcc (one shared library each, named `nvcc: ...`)."""
    triton = collections.Counter(p.stem for p in cache.rglob("*.cubin"))
    nvcc = collections.Counter(f"nvcc: {p.stem}" for p in (cache / "flashinfer").rglob("*.so"))
    return triton + nvcc


def cache_env(cache: Path) -> dict[str, str]:
    """This environment with every compile cache under `cache`."""
    return dict(os.environ, **{name: str(cache / sub) for name, sub in CACHE_VARIABLES.items()})


def timed_start(args, cache: Path) -> tuple[float, list[str]]:
    cmd = [sys.executable, __file__, "--child", *model_argv(args, args.model_dir)]
    cmd += ["--inspect-in-subprocess"] if args.inspect_in_subprocess else []
    done = subprocess.run(cmd, capture_output=True, text=True, env=cache_env(cache))
    if done.returncode:
        raise RuntimeError(f"the engine did not start:\n{done.stderr[-3000:]}")
    result = [line for line in done.stdout.splitlines() if line.startswith('{"start_s"')][-1]
    log = done.stdout + done.stderr
    return json.loads(result)["start_s"], [architecture_resolution(log)] + vllm_start_lines(log)


def architecture_resolution(log: str) -> str:
    """Seconds from vLLM's first line (its arguments) to "Resolved architecture": where vLLM inspects
    a model class it has not imported (a subprocess, unless RolloutEngine registered the class)."""
    stamps = [line.split("[", 1)[0].split()[-1] for line in log.splitlines()
              if "non-default args" in line or "Resolved architecture" in line]
    if len(stamps) < 2:
        return "architecture resolved after: not in vLLM's log"
    begin, end = (datetime.datetime.strptime(t, "%H:%M:%S") for t in stamps[:2])
    return f"architecture resolved after {(end - begin).total_seconds():.0f} s"


def prewarm(args, cache: Path) -> float:
    """`k2rl prewarm` of the benchmark's job into `cache`, in a process of its own; its seconds."""
    from k2rl.config import dump_config

    job = job_config(args).model_copy(deep=True)
    job.model.path = str(args.model_dir)
    job_file = cache / "job.yaml"
    cache.mkdir(parents=True, exist_ok=True)
    dump_config(job, job_file)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "k2rl.cli", "prewarm", str(job_file)], capture_output=True,
                          text=True, env=cache_env(cache))
    if done.returncode:
        raise RuntimeError(f"k2rl prewarm failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--inspect-in-subprocess", action="store_true",
                    help="leave the model class to vLLM's inspection subprocess, as plain vLLM does")
    ap.add_argument("--prewarm", action="store_true", help="also a start after `k2rl prewarm` into fresh caches")
    ap.add_argument("--cache-env", metavar="DIR", help="only print the shell exports that point every cache "
                    "this bench redirects under DIR (scripts/gpu_check.sh's COLD=1), then exit")
    args = ap.parse_args()
    if args.child:
        return start_engine(args)
    if args.cache_env:
        return print(" ".join(f"export {name}={shlex.quote(str(Path(args.cache_env) / sub))};"
                              for name, sub in CACHE_VARIABLES.items()))

    from k2rl.model.build import make_model

    if args.model_dir is None:
        preset = args.preset or job_config(args).model.preset
        # on the host: this process keeps no GPU memory or context beside the engines it starts
        args.model_dir = make_model(preset, tempfile.mkdtemp(prefix="bench-vllm-start-"), seed=0, device="cpu")
    cache = Path(tempfile.mkdtemp(prefix="bench-vllm-start-caches-"))
    seen = collections.Counter()
    seconds = {}
    for kind in ("cold", "warm"):
        seconds[kind], parts = timed_start(args, cache)
        report(kind, seconds[kind], parts, compiled_kernels(cache) - seen)
        seen = compiled_kernels(cache)
    if args.prewarm:
        prewarmed = Path(tempfile.mkdtemp(prefix="bench-vllm-start-prewarmed-"))
        print(f"k2rl prewarm into fresh caches: {prewarm(args, prewarmed):.1f} s", flush=True)
        seen = compiled_kernels(prewarmed)
        seconds["after prewarm"], parts = timed_start(args, prewarmed)
        report("after prewarm", seconds["after prewarm"], parts, compiled_kernels(prewarmed) - seen)
        print(f"after prewarm / cold: {seconds['after prewarm'] / seconds['cold']:.2f}", flush=True)


def report(kind: str, seconds: float, parts: list[str], compiled: collections.Counter) -> None:
    print(f"{kind} start: {seconds:.1f} s; kernels compiled: {sum(compiled.values())}", flush=True)
    for line in parts:
        print(f"  {line}", flush=True)
    for name, count in compiled.most_common(12):
        print(f"  {count:4d} x {name}", flush=True)


if __name__ == "__main__":
    main()
