"""One colocated RL step on the H200, measured against baselines taken in the same run (issue 12):

- rollout: the Worker's vLLM (sleep mode, weights reloaded from the trainer) vs a standalone vLLM
  `LLM` as a user would start it (the engine's dtype, lengths, memory and CUDA graphs; no sleep mode,
  no routing replay; requests unseeded, vLLM's fastest sampling) and vs the RolloutEngine alone (with
  `--replay-baseline` and routing replay on, also alone without replay), on the same prompts and
  sampling: tokens/s, each baseline in a process of its own beside the Worker, their generates
  taking turns;
- train: the Worker's trainer (DeepSpeed, MuonClip, fp32 master + bf16 autocast) vs plain
  transformers with grouped_mm experts (bf16, fused AdamW), on the same batch, with the config's
  gradient checkpointing and (when that is on) again without: tokens/s and MFU
  (6 x active params x tokens / 790 TFLOP/s; active = all parameters minus the input embedding and
  the routed experts a token does not use; attention scores and recomputation not counted); the
  trainer's step right after the switch from rollout (what an RL step of one micro-batch pays: the
  trainer's memory comes back from the host and its allocator starts empty) and in the steady state;
- sync: trainer -> vLLM GB/s vs a device copy of the same bytes;
- sleep / wake / offload / reload times and GPU memory in each phase (second round trip: the first
  offload pins host memory);
- the vLLM-trainer logprob gap on the sampled tokens, before and after a train step + sync;
- with `--profile`, where the Worker's generate and each rollout baseline's spend their time, side by
  side: GPU kernels, launches, the host's CUDA calls, the garbage collector, each thread's CPU time,
  the top host functions; with `--colocation-only`, only the Worker's first rollouts and the engine
  alone beside them (what colocation costs, in a few minutes); with `--rollout-only`, only the Worker
  after one step + sync against standalone vLLM (the rollout goal's row, for several runs in one call).

    python scripts/bench_gpu_step.py [--config configs/k2-mini-1gpu.yaml] [--eager] [--replay-baseline] [--profile]
                                     [--colocation-only | --rollout-only] [--pairs N] [--set KEY=VALUE] [--json OUT.json]

A SIGTERM (a device call's time limit) still prints, and writes, the figures measured so far.

On a CPU it runs as a smoke test of the same code (k2-tiny, fp32, no sleep mode, no training baselines:
they need CUDA): python scripts/bench_gpu_step.py --preset k2-tiny --prompts 8 --new-tokens 16
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import NoReturn

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from k2rl.commands import add_set_argument, set_arguments  # noqa: E402
from k2rl.engines.routing_at_finish import patch_routing_at_finish  # noqa: E402
from k2rl.engines.seeded_sampling import patch_seeded_sampling  # noqa: E402
from generate_profile import ON_GPU, compare_profiles, profile_generate, timed  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cuda" if ON_GPU else "cpu")
PEAK_TFLOPS = 790.0  # H200 dense bf16, measured (PLATFORM.md); the H100 SXM has the same tensor-core peak
ROLLOUT_REPEATS = 3
PAIRED_REPEATS = 7  # pairs one generate apart; their ratio swung 0.73-0.95 in five (H100, 2026-12-07)
STEADY_STEPS = 3


def used_gib() -> float:
    if not ON_GPU:
        return 0.0
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def best_rate(generate, count_tokens):
    """(outputs, best tokens/s) over ROLLOUT_REPEATS runs of `generate` on the same prompts and seeds:
    the machine is shared, and one timing of a ~4 s generate was seen 30% off the next."""
    best, outputs = 0.0, None
    for _ in range(ROLLOUT_REPEATS):
        outputs, seconds = timed(generate)
        best = max(best, count_tokens(outputs) / seconds)
    return outputs, best


def engine_tokens(outputs) -> int:
    return sum(len(g.token_ids) for (g,) in outputs)


def active_params(config) -> int:
    """Parameters one token's forward touches, less the input embedding (a lookup)."""
    from k2rl.model.modeling import build_model

    with torch.device("meta"):
        model = build_model(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel()
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    return int(total - embed - routed * (1 - config.num_experts_per_tok / config.n_routed_experts))


def job_config(args):
    from k2rl.config import load_config

    overrides = [f"rollout.enforce_eager={str(args.eager).lower()}", *args.overrides]
    if not ON_GPU:
        overrides += ["model.dtype=float32", "rollout.kv_cache_memory_bytes=268435456", "rollout.max_model_len=1024",
                      "rollout.routing_replay=false"]
    return load_config(args.config, overrides)


def logprob_gap(worker, batch, prefix: str) -> dict[str, float]:
    """Mean and max |vLLM - trainer| logprob over the batch's sampled tokens (the worker's own metric),
    with routing replay when the batch carries vLLM's routing, and then without it."""
    from k2rl.engines.types import ROUTED_EXPERTS

    def measured(name: str) -> dict[str, float]:
        worker.logprobs(batch)
        stats = worker.stats()
        return {f"{name}_mean": stats["mismatch/logprob_abs"], f"{name}_max": stats["mismatch/logprob_abs_max"]}

    out = {}
    if ROUTED_EXPERTS in batch.token_data:
        out = measured(f"{prefix}_replay")
        del batch.token_data[ROUTED_EXPERTS]
    return {**out, **measured(prefix)}


# What the RolloutEngine adds to plain vLLM (k2rl.engines.rollout), one at a time on top of plain vLLM
# in scripts/bench_rollout_settings.py: which of them costs the rollout its speed
ENGINE_SETTINGS = {
    "sleep_mode": dict(enable_sleep_mode=True),
    "routing_replay": dict(enable_return_routed_experts=True),
    "structured_outputs": dict(structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True}),
}
# ... and how the engine's requests differ from a user's, which plain vLLM sends unseeded: a seed each
# (`seeded`; k2rl seeds every rollout request, so that a resumed run samples what the uninterrupted one
# did, and stock vLLM samples a seeded request's noise apart from the batch, one kernel per request
# and step), and logprobs as a few lists per request instead of a dict and an object per token
SAMPLING_SETTINGS = {"seeded": {}, "flat_logprobs": dict(flat_logprobs=True)}
# ... and what the engine patches into vLLM, each with the setting it is for: seeded requests' noise in
# one kernel (k2rl.engines.seeded_sampling), and routing replay's rows read once per request as it
# finishes instead of sliced out per request and step (k2rl.engines.routing_at_finish)
PATCH_SETTINGS = {"batched_seeds": (patch_seeded_sampling, {}),
                  "lean_routing_replay": (patch_routing_at_finish, ENGINE_SETTINGS["routing_replay"])}
SEEDED_SETTINGS = ("seeded", "batched_seeds")  # the patch is for seeded requests


def standalone_generate(model_dir, job, prompts, sampling, as_rollout_engine: bool, setting: str | None = None):
    """A baseline engine, warmed up; returns a function that generates on `prompts` and counts the tokens.
    Plain vLLM, as a user would start it and send requests (unseeded), with the rollout engine's lengths,
    memory and CUDA graphs (and one of the settings above where `setting` names it); or the project's
    RolloutEngine alone (sleep mode, structured-output backend, routing replay; no trainer beside it),
    which tells the engine's settings apart from the colocation."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from k2rl.engines.rollout import CPU_ATTENTION_BACKEND, FLASHINFER_SAMPLER_DEFAULT, head_dtype_override

    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", FLASHINFER_SAMPLER_DEFAULT)  # the engine's start
    if as_rollout_engine:
        from k2rl.engines.rollout import RolloutEngine
        from k2rl.engines.types import SamplingConfig

        engine = RolloutEngine.from_config(model_dir, job.rollout, job.model, job.run.seed)
        engine.generate(prompts[:8], SamplingConfig(max_tokens=8, seed=0))  # warm-up
        return lambda: engine_tokens(engine.generate(prompts, sampling))
    r = job.rollout
    kwargs = dict(model=str(model_dir), dtype=job.model.dtype, seed=job.run.seed, max_model_len=r.max_model_len,
                  enforce_eager=r.enforce_eager, gpu_memory_utilization=r.gpu_memory_utilization,
                  **head_dtype_override(job.model.dtype, job.model.fp32_head))
    if r.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = r.kv_cache_memory_bytes
    kwargs.update(ENGINE_SETTINGS.get(setting, {}))
    if setting in PATCH_SETTINGS:
        patch, setting_kwargs = PATCH_SETTINGS[setting]
        if not patch() and ON_GPU:
            raise RuntimeError(f"{patch.__name__} does not apply to this vLLM: {setting} would measure stock vLLM")
        kwargs.update(setting_kwargs)
    if not ON_GPU:  # the CPU smoke run, as the engine starts vLLM-CPU
        kwargs["attention_backend"] = CPU_ATTENTION_BACKEND
    llm = LLM(**kwargs)
    params = [SamplingParams(temperature=sampling.temperature, max_tokens=budget, logprobs=0, detokenize=False,
                             seed=seed if setting in SEEDED_SETTINGS else None, **SAMPLING_SETTINGS.get(setting, {}))
              for budget, seed in sampling.per_prompt(len(prompts))]
    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(token_prompts[:8], params[:8], use_tqdm=False)  # warm-up
    return lambda: sum(len(o.outputs[0].token_ids) for o in llm.generate(token_prompts, params, use_tqdm=False))


def serve_standalone(generate) -> None:
    """The baseline's process: per line on stdin one generate, timed ("go": its tokens/s) or profiled
    ("profile": `profile_generate`), answered as a JSON line."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "profile":
            print(json.dumps({"profile": profile_generate(generate)}), flush=True)
            continue
        print(json.dumps({"tokens_per_s": rate_of(generate)}), flush=True)


def rate_of(generate) -> float:
    """Tokens/s of one timed call of `generate` (which returns its token count)."""
    tokens, seconds = timed(generate)
    return tokens / seconds


class StandaloneBaseline:
    """A baseline engine in a process of its own (a second engine in the worker's process fails in its
    compiled kernels), kept running beside the Worker so that their generates take turns: each pair of
    timings is seconds apart, and the shared machine's noise, which moved one engine 2x between runs
    minutes apart, moves both alike."""

    def __init__(self, args, model_dir, kind: str, overrides: tuple[str, ...] = (), setting: str | None = None):
        self.kind = kind if setting is None else f"{kind} + {setting}"
        cmd = [sys.executable, __file__, "--standalone-only", kind, *model_argv(args, model_dir), "--prompts",
               str(args.prompts), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               *set_arguments(overrides), *(["--vllm-setting", setting] if setting else [])]
        self.output: list[str] = []  # its stdout, vLLM's log among it, for vLLM's account of its start
        self.errors = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True)
        try:
            self._read("ready")
        except BaseException:
            self.close()
            raise

    def tokens_per_s(self) -> float:
        return self._ask("go", "tokens_per_s")

    def profile(self) -> dict:
        """`profile_generate` in that process."""
        return self._ask("profile", "profile")

    def _ask(self, command: str, key: str):
        try:
            self.proc.stdin.write(f"{command}\n")
            self.proc.stdin.flush()
        except OSError:  # it died: its stderr says why
            self._failed()
        return self._read(key)

    def close(self) -> list[str]:
        """Stop the process; vLLM's account of its start (with this machine's caches warm)."""
        try:
            rest, _ = self.proc.communicate(timeout=120)  # closes its stdin: it leaves its loop
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            rest, _ = self.proc.communicate()
        self.errors.seek(0)
        lines = vllm_start_lines("".join(self.output) + (rest or "") + self.errors.read())
        self.errors.close()
        return lines

    def _read(self, key: str):
        for line in self.proc.stdout:
            if line.startswith(f'{{"{key}"'):
                return json.loads(line)[key]
            self.output.append(line)
        self._failed()

    def _failed(self) -> NoReturn:
        self.proc.wait()
        self.errors.seek(0)
        raise RuntimeError(f"standalone {self.kind} failed:\n{self.errors.read()[-3000:]}")


def paired_rates(first, second, names: tuple[str, str, str], repeats: int = PAIRED_REPEATS) -> dict[str, float | list[float]]:
    """`first` and `second` (each a generate returning its tokens/s) in turn, `repeats` times, which
    goes first alternating from pair to pair (so that a cost of going first or second, or a machine
    speeding up or slowing down within a pair, does not favour one side); figures under `names`
    (first, second, ratio): each one's best tokens/s, and second/first per pair: the median, the
    lowest and the highest (how far one pair is from the next on this machine: one H100 pair in three
    was 0.71 of its median, 2026-12-06), and every pair's in the order run (`rollout_runs.py` pools
    them over runs)."""
    def pair(second_goes_first: bool) -> tuple[float, float]:
        if second_goes_first:
            b = second()
            return first(), b
        return first(), second()

    pairs = [pair(i % 2 == 1) for i in range(repeats)]
    in_order = [b / a for a, b in pairs]
    ratios = sorted(in_order)
    first_name, second_name, ratio = names
    return {first_name: max(a for a, _ in pairs), second_name: max(b for _, b in pairs),
            ratio: ratios[len(ratios) // 2], f"{ratio}_lowest": ratios[0], f"{ratio}_highest": ratios[-1],
            f"{ratio}_pairs": in_order}


def grouped_mm_tokens_per_s(model_dir, batch, checkpointing: bool, steps: int = 3) -> float:
    """transformers' own DeepseekV3 with grouped_mm experts: bf16, fused AdamW."""
    from k2rl.model.checkpoint import load_config
    from transformers import DeepseekV3ForCausalLM

    config = load_config(model_dir)
    config._attn_implementation = "sdpa"
    config._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    ids = torch.nn.utils.rnn.pad_sequence(batch.input_ids, batch_first=True).cuda()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    _, seconds = timed(lambda: [step() for _ in range(steps)])
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return ids.numel() * steps / seconds


def steady_steps(worker, batch, loss) -> tuple[float, float]:
    """Seconds a step over STEADY_STEPS steps, and their peak GPU memory (`peak_above`)."""
    (_, seconds), peak = peak_above(lambda: timed(lambda: [worker.train_step(batch, loss) for _ in range(STEADY_STEPS)]))
    return seconds / STEADY_STEPS, peak


def peak_above(fn) -> tuple[object, float]:
    """`fn()` and its peak GPU memory (GiB) above what was allocated before it: the trainer's activations
    and transients. (torch's peak counter is reset, not read whole: it counts vLLM's sleeping memory
    pool, unmapped, as allocated.)"""
    before = torch.cuda.memory_allocated() if ON_GPU else 0
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    out = fn()
    return out, (torch.cuda.max_memory_allocated() - before) / 2**30 if ON_GPU else 0.0


def device_copy_gb_per_s(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    _, seconds = timed(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / seconds / 1e9


def model_arguments(description: str) -> argparse.ArgumentParser:
    """The options the GPU benchmarks share: which config, model and vLLM mode (`job_config` reads them)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/k2-mini-1gpu.yaml")
    ap.add_argument("--preset", default=None, help="model preset (default: the config's)")
    ap.add_argument("--model-dir", default=None, help="an existing model directory of that preset (else one is built)")
    ap.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs (enforce_eager)")
    add_set_argument(ap)
    return ap


def rollout_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The rollout's workload (`rollout_workload` reads it): random prompts, sampled to a fixed length;
    and how many pairs of generates (`paired_rates`) compare two engines on it."""
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--pairs", "--repeats", type=pair_count, default=PAIRED_REPEATS,
                    help="generates in turn per comparison (--repeats: its earlier name in bench_rollout_settings.py)")
    return ap


def pair_count(text: str) -> int:
    """`--pairs`: at least one pair, since the ratio is the pairs' median."""
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count}: give at least 1 (the ratio is the pairs' median)")
    return count


def rollout_workload(args, vocab: int, gen: torch.Generator):
    """(prompts, sampling) of `rollout_arguments`: the same for every engine and process of a run."""
    from k2rl.engines.types import SamplingConfig

    prompts = [torch.randint(20, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    return prompts, SamplingConfig(temperature=1.0, max_tokens=args.new_tokens, seed=1)


def model_argv(args, model_dir) -> list[str]:
    """`model_arguments`' options as parsed, for a child process of a benchmark script."""
    argv = ["--model-dir", str(model_dir), "--config", args.config] + (["--eager"] if args.eager else [])
    return argv + set_arguments(args.overrides)


def main() -> None:
    ap = rollout_arguments(model_arguments(__doc__))
    ap.add_argument("--train-seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--replay-baseline", action="store_true",
                    help="a third rollout baseline, the engine alone without routing replay: what replay costs "
                         "(one more vLLM start, at the end of the run)")
    ap.add_argument("--profile", action="store_true",
                    help="after each rollout baseline's pairs, one generate of it and of the Worker under torch's "
                         "profiler and cProfile, side by side (kernels, the host's CUDA calls, garbage collector, "
                         "threads, host functions)")
    only = ap.add_mutually_exclusive_group()  # a part of the run in place of the whole
    only.add_argument("--colocation-only", action="store_true",
                      help="only the Worker's rollout before any switch against the engine alone (with --profile: "
                           "what colocation costs, in a few minutes)")
    only.add_argument("--rollout-only", action="store_true",
                      help="only the Worker's rollout after one train step + sync against standalone vLLM (the "
                           "rollout goal's row, in a few minutes: `gpu_check.sh rollout` runs it several times, "
                           "since one run's median moved 0.79-1.007 across nine runs on H100s)")
    ap.add_argument("--standalone-only", choices=("vllm", "engine"), help=argparse.SUPPRESS)  # a baseline's own process
    ap.add_argument("--vllm-setting", choices=(*ENGINE_SETTINGS, *SAMPLING_SETTINGS, *PATCH_SETTINGS),
                    help=argparse.SUPPRESS)  # ... with one
    args = ap.parse_args()

    from k2rl.engines.types import TokenBatch
    from k2rl.model.build import make_model
    from k2rl.model.checkpoint import load_config

    job = job_config(args)
    preset = args.preset or job.model.preset
    out: dict[str, float | str] = {"preset": preset, "cuda_graphs": str(not job.rollout.enforce_eager)}
    model_dir = args.model_dir or make_model(preset, tempfile.mkdtemp(prefix="bench-gpu-step-"), seed=0)
    config = load_config(model_dir)
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts, sampling = rollout_workload(args, vocab, gen)
    if args.standalone_only:
        return serve_standalone(standalone_generate(model_dir, job, prompts, sampling, args.standalone_only == "engine",
                                                    args.vllm_setting))
    train_batch = TokenBatch.from_lists(torch.randint(20, vocab, (args.train_seqs, args.seq_len), generator=gen).tolist())
    # Python dies of SIGTERM without running `finally`; as an exit, the figures so far are printed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        measure(args, job, model_dir, config, prompts, sampling, train_batch, out)
    finally:
        print_figures(out, args.json)


def vllm_start_lines(log: str) -> list[str]:
    """vLLM's own account of its start (weights, compile, profiling run, graph capture, engine init,
    the KV cache it got: a smaller one runs fewer sequences at once; whether it schedules ahead)."""
    keys = ("took", "Compiling a graph", "Graph capturing", "KV cache size", "Maximum concurrency",
            "Asynchronous scheduling")
    return [line.split("] ", 1)[-1] for line in log.splitlines() if any(key in line for key in keys)]


def profile_sync(worker) -> None:
    """Where one sync's time goes (Python functions, by own time), printed: vLLM's in-place reload
    is most of the sync (see sync/export_only_s)."""
    import cProfile
    import pstats

    from k2rl.worker import sync_weights

    worker.rollout.wake(("weights",))
    profiler = cProfile.Profile()
    profiler.runcall(sync_weights, worker.train, worker.rollout, worker.job.rollout.weight_bucket_bytes)
    if ON_GPU:
        torch.cuda.synchronize()
    worker.rollout.sleep()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def print_figures(out: dict, json_path: str | None) -> None:
    width = max(len(k) for k in out)
    for k, v in out.items():
        if isinstance(v, list):  # a figure per pair
            v = " ".join(f"{x:.3f}" for x in v)
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)


ROLLOUT_BASELINES = (("vllm", "standalone_vllm", ()), ("engine", "engine_alone", ()))
COLOCATION_BASELINE = ROLLOUT_BASELINES[1:]  # `--colocation-only`: before any switch, the engine alone only
STANDALONE_BASELINE = ROLLOUT_BASELINES[:1]  # `--rollout-only`: after one step + sync, plain vLLM only
# The engine alone without routing replay: what replay costs (`--replay-baseline`, last: optional)
REPLAY_BASELINE = (("engine", "engine_alone_without_replay", ("rollout.routing_replay=false",)),)


def compare_rollout(args, model_dir, worker_generate, out: dict, baselines) -> None:
    """The Worker's vLLM against each baseline, their generates taking turns (`paired_rates`); with
    `--profile`, then one generate of each profiled, side by side (`compare_profiles`). Once the
    baseline's process has ended, the Worker alone again (best of ROLLOUT_REPEATS): beside its figure
    before any baseline, whether taking turns with another process moves the Worker's own rate."""
    for kind, name, overrides in baselines:
        baseline = StandaloneBaseline(args, model_dir, kind, overrides)
        try:
            out.update(paired_rates(baseline.tokens_per_s, lambda: rate_of(worker_generate), (
                f"baseline/{name}_tokens_per_s", f"rollout/tokens_per_s_beside_{name}", f"rollout/vs_{name}"),
                args.pairs))
            if args.profile:
                out.update(compare_profiles("worker", name, baseline.profile(), profile_generate(worker_generate)))
        finally:
            for line in baseline.close():
                print(f"[{name} start] {line}", flush=True)
        _, out[f"rollout/tokens_per_s_alone_after_{name}"] = best_rate(worker_generate, int)  # it counts its tokens


def measure(args, job, model_dir, config, prompts, sampling, train_batch, out: dict) -> None:
    """Fills `out` as it goes, so a failure late in the run still reports what was measured."""
    from k2rl.config import AlgorithmConfig
    from k2rl.engines.types import SamplingConfig, completion_batch, concat_batches
    from k2rl.engines.world import free_port
    from k2rl.loop.objective import Objective
    from k2rl.worker import Worker

    out["memory/start"] = used_gib()
    nll = Objective(AlgorithmConfig(name="sft"))  # next-token loss on the batch's loss tokens

    worker = Worker(0, 1)
    master = ("127.0.0.1", free_port())
    _, out["time/setup"] = timed(lambda: worker.setup(str(model_dir), job.model_dump(mode="json"), master))
    out.update({k: v for k, v in worker.stats().items() if k.startswith("time/")})
    out["memory/rollout"] = used_gib()

    worker.generate(prompts[:8], SamplingConfig(max_tokens=8, seed=0))  # warm-up
    first, out["rollout/tokens_per_s"] = best_rate(lambda: worker.generate(prompts, sampling), engine_tokens)
    worker_generate = lambda: engine_tokens(worker.generate(prompts, sampling))  # noqa: E731
    if args.colocation_only:
        compare_rollout(args, model_dir, worker_generate, out, COLOCATION_BASELINE)
        return
    if args.rollout_only:  # the rollout goal's row alone, as the full run measures it: after a step + sync
        worker.to_train()
        worker.train_step(train_batch, nll)
        worker.to_rollout()
        compare_rollout(args, model_dir, worker_generate, out, STANDALONE_BASELINE)
        return

    for round_trip in range(2):  # the second is the steady state
        worker.to_train()
        out["memory/train_idle"] = used_gib()
        switch = worker.stats()
        if round_trip == 0:
            out.update(logprob_gap(worker, completion_batch(prompts, first), "gap/before"))
            worker.train_step(train_batch, nll)  # warm-up (and the update the gap is measured after)
            worker.stats()
        _, seconds = timed(lambda: worker.train_step(train_batch, nll))
        if round_trip == 1:  # the steps after the first: what a step costs without the switch before it
            seconds_steady, out["memory/train_step_peak_increase"] = steady_steps(worker, train_batch, nll)
        worker.to_rollout()
        switch.update(worker.stats())
    tokens = sum(len(s) for s in train_batch.input_ids)
    out["train/tokens_per_s"] = tokens / seconds
    out["train/tokens_per_s_steady"] = tokens / seconds_steady
    out["train/mfu_steady"] = 6 * active_params(config) * out["train/tokens_per_s_steady"] / (PEAK_TFLOPS * 1e12)
    out.update({k: switch[k] for k in ("time/sleep", "time/reload", "time/wake", "time/sync", "time/offload",
                                       "sync/bytes", "sync/gb_per_s") if k in switch})
    out["memory/rollout_after_sync"] = used_gib()
    worker.to_train()  # the trainer's export alone (cast into buckets), without vLLM's load: the sync's floor
    _, out["sync/export_only_s"] = timed(lambda: sum(1 for _ in worker.train.export_weights(
        job.rollout.weight_bucket_bytes, worker.rollout.dtype)))
    profile_sync(worker)
    # An RL step accumulates many micro-batches per optimizer step. Four of them (one per copy of the
    # batch, at the config's micro_batch_tokens) split the step into forward+backward and the optimizer.
    worker.train_step(train_batch, nll)  # untimed: the step after the switch pays for it, this one too
    # (its peak: from the second micro-batch on, the accumulated gradients sit beside the activations)
    (_, seconds_four), out["memory/train_step_peak_increase_4_micro_batches"] = peak_above(
        lambda: timed(lambda: worker.train_step(concat_batches([train_batch] * 4), nll)))
    fwd_bwd = (seconds_four - seconds_steady) / 3
    out["train/tokens_per_s_4_micro_batches"] = 4 * tokens / seconds_four
    out["train/fwd_bwd_tokens_per_s"] = tokens / fwd_bwd
    out["time/optimizer_step"] = seconds_steady - fwd_bwd
    checkpointing = worker.train.model.is_gradient_checkpointing
    if checkpointing:  # what the step costs where memory allows it without (k2-mini on one GPU does)
        worker.train.model.gradient_checkpointing_disable()
        worker.train_step(train_batch, nll)  # warm-up: the allocator grows to the larger activations
        seconds_plain, out["memory/train_step_peak_increase_no_checkpointing"] = steady_steps(worker, train_batch, nll)
        out["train/tokens_per_s_no_checkpointing"] = tokens / seconds_plain
        worker.train.model.gradient_checkpointing_enable()
    worker.to_rollout()

    after, out["rollout/tokens_per_s_after_reload"] = best_rate(lambda: worker.generate(prompts, sampling), engine_tokens)
    # the baselines beside the Worker's awake vLLM (k2-mini on a GPU: ~28 GiB each at k2-mini-1gpu.yaml's 0.35)
    compare_rollout(args, model_dir, worker_generate, out, ROLLOUT_BASELINES)
    worker.to_train()
    out.update(logprob_gap(worker, completion_batch(prompts, after), "gap/after_step_sync"))

    if ON_GPU:
        out["sync/device_copy_gb_per_s"] = device_copy_gb_per_s(int(out["sync/bytes"]))
        worker.train.offload()  # leave the GPU to the baselines (vLLM already sleeps in TRAIN)
        out["memory/all_offloaded"] = used_gib()
        out["baseline/grouped_mm_tokens_per_s"] = grouped_mm_tokens_per_s(model_dir, train_batch, checkpointing)
        if checkpointing:
            out["baseline/grouped_mm_tokens_per_s_no_checkpointing"] = grouped_mm_tokens_per_s(model_dir, train_batch, False)
            out["train/vs_grouped_mm_no_checkpointing"] = (out["train/tokens_per_s_no_checkpointing"]
                                                           / out["baseline/grouped_mm_tokens_per_s_no_checkpointing"])
        out["baseline/grouped_mm_mfu"] = (6 * active_params(config) * out["baseline/grouped_mm_tokens_per_s"]
                                          / (PEAK_TFLOPS * 1e12))
        # Both steady (the baseline's steps follow a warm-up); the step right after the switch beside it.
        out["train/vs_grouped_mm"] = out["train/tokens_per_s_steady"] / out["baseline/grouped_mm_tokens_per_s"]
        out["train/after_switch_vs_grouped_mm"] = out["train/tokens_per_s"] / out["baseline/grouped_mm_tokens_per_s"]
        out["sync/vs_device_copy"] = out["sync/gb_per_s"] / out["sync/device_copy_gb_per_s"]
    if args.replay_baseline and job.rollout.routing_replay:
        worker.train.reload()  # offloaded for the grouped_mm baselines; the switch syncs from it
        worker.to_rollout()
        compare_rollout(args, model_dir, worker_generate, out, REPLAY_BASELINE)


if __name__ == "__main__":
    main()
