"""CPU benchmark: one SFT train step of k2-tiny on one thread, as one demo worker runs it.

    python scripts/bench_cpu_step.py [--steps 5] [--malloc-defaults] [--profile [--math-attention]]

The batch is one worker's half (`shard(0, 2)`) of 16 of the scripted oracle's shop dialogs, tokenized
as the SFT stage does, stepped through the real TrainEngine (DeepSpeed ZeRO 0 on gloo, a world of one,
MuonClip, QK-Clip) with `configs/demo-sft.yaml`. A world of one does all of Newton-Schulz itself (two
demo workers split it).

Steps alternate between the engine as it is, the same without running the dialogs' shared prefix
(system prompt and tool schemas) once (`train.shared_prefix`, k2rl.model.shared_prefix), with
SDPA's math kernel, which attention ran on the CPU before (see k2rl.model.attention), and with
every position projected to the vocabulary, not only the loss tokens' (as before 2026-12-05), and with
DeepSpeed's gradient all-reduce, which a world of one skips (as before 2026-12-06), so their ratios
are measured in one run on a shared, noisy machine. Per variant: median wall seconds of each
phase (forward, backward, optimizer step, QK-Clip, the rest), and the step's CPU seconds (user +
sys, which time-slicing by other jobs does not inflate) and page faults. Then the bare model's forward + backward of the same batch (no engine or optimizer).

--malloc-defaults keeps glibc's malloc thresholds (the engine raises them,
`k2rl.engines.train.keep_freed_memory_in_heap`); compare the CPU seconds of a run with and without.
--profile: torch.profiler's top operators of one step.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import k2rl.engines.train  # noqa: E402
import k2rl.model.attention  # noqa: E402
import k2rl.optim  # noqa: E402
from k2rl.config import load_config  # noqa: E402
from k2rl.engines.world import single_rank_world  # noqa: E402
from k2rl.env.factory import EnvFactory  # noqa: E402
from k2rl.loop.data import sft_batch  # noqa: E402
from k2rl.loop.objective import Objective  # noqa: E402
from k2rl.loop.tasks import TaskStream  # noqa: E402
from k2rl.model.build import make_model  # noqa: E402
from k2rl.model.chat import ChatTokenizer  # noqa: E402
from k2rl.model.shared_prefix import padded_logprobs  # noqa: E402
from k2rl.rollout import Limits, oracle_trajectory  # noqa: E402

CONFIG = "configs/demo-sft.yaml"
PHASES = ("forward", "backward", "optimizer", "qk_clip", "other", "total")


def oracle_batch(job, model_dir, count: int):
    """`count` solved oracle dialogs as the trainer's `oracle_examples` + `sft_batch` build them."""
    chat, make_env = ChatTokenizer(model_dir), EnvFactory(job.env)
    tasks = TaskStream(make_env, job.env.train_seed)
    limits = Limits.from_config(job.env, job.algorithm.max_new_tokens, job.rollout.max_model_len)
    examples = []
    while len(examples) < count:
        for task in tasks.next(count - len(examples)):
            t = oracle_trajectory(make_env(), task, chat, limits)
            if t.success:
                examples.append((t.token_ids, [bool(m) for m in t.loss_mask]))
    return sft_batch(examples)


@contextmanager
def patched(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def math_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """SDPA on MLA's narrower values as given: on the CPU, its math kernel."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def with_math_attention():
    return patched(k2rl.model.attention, "_cpu_flash_attention", math_attention)


def score_every_token():
    """The vocabulary projection and log-softmax on every position, not only the loss tokens'."""
    every = lambda module, ids, attn, shared, replay, wanted: padded_logprobs(module, ids, attn, shared, replay)  # noqa: E731
    return patched(k2rl.engines.train, "padded_logprobs", every)


def timed_step(engine, batch, objective) -> dict[str, float]:
    """One train step: wall seconds in total and per phase (each phase's calls wrapped with a timer),
    CPU seconds and page faults."""
    seconds = dict.fromkeys(PHASES, 0.0)

    def timed(phase, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - start
        return call

    with patched(engine, "_forward_logprobs", timed("forward", engine._forward_logprobs)), \
            patched(engine.engine, "backward", timed("backward", engine.engine.backward)), \
            patched(engine.client_optimizer, "step", timed("optimizer", engine.client_optimizer.step)), \
            patched(k2rl.optim, "apply_qk_clip", timed("qk_clip", k2rl.optim.apply_qk_clip)):  # imported per call
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        engine.train_step(batch, objective)
        seconds["total"], after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    seconds["other"] = seconds["total"] - sum(seconds[p] for p in PHASES[:4])
    seconds["cpu"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    seconds["sys"] = after.ru_stime - before.ru_stime
    seconds["faults"] = after.ru_minflt - before.ru_minflt
    return seconds


def bare_forward_backward(engine, batch, objective) -> float:
    """Seconds of the same micro-batches' forward + loss + backward on the bare module."""
    start = time.perf_counter()
    total = batch.num_loss_tokens()
    for mb in batch.micro_batches(engine.job.train.micro_batch_tokens, engine._shared_prefix(batch)):
        loss, _ = objective(engine._forward_logprobs(mb, engine.model), mb)
        (loss * mb.num_loss_tokens() / total).backward()
    engine.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each variant (after a warm-up step)")
    parser.add_argument("--dialogs", type=int, default=16, help="dialogs per step over both workers")
    parser.add_argument("--malloc-defaults", action="store_true", help="leave glibc's malloc thresholds as they are")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's top operators of one step")
    parser.add_argument("--math-attention", action="store_true", help="with --profile: on SDPA's math kernel")
    args = parser.parse_args()
    torch.set_num_threads(1)
    single_rank_world()

    job = load_config(CONFIG)
    model_dir = make_model(job.model.preset, tempfile.mkdtemp(prefix="k2-tiny-"), seed=0)
    batch = oracle_batch(job, model_dir, args.dialogs).shard(0, 2)
    mbs = batch.micro_batches(job.train.micro_batch_tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; one worker's batch: {len(batch)} dialogs, "
          f"{sum(len(s) for s in batch.input_ids)} tokens, {sum(max(map(len, mb.input_ids)) * len(mb) for mb in mbs)} "
          f"padded in {len(mbs)} micro-batches, {batch.num_loss_tokens()} loss tokens")

    keep_malloc_defaults = patched(k2rl.engines.train, "keep_freed_memory_in_heap", lambda: None)
    with keep_malloc_defaults if args.malloc_defaults else nullcontext():
        engine = k2rl.engines.train.TrainEngine(model_dir, job)
    objective = Objective(job.algorithm)
    engine.train_step(batch, objective)  # warm-up: optimizer state, first-call costs
    if args.profile:
        with with_math_attention() if args.math_attention else nullcontext():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                engine.train_step(batch, objective)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50))
        return

    variants = {"as is": nullcontext, "unshared": lambda: patched(engine, "_shared_prefix", lambda batch: 0),
                "math attn": with_math_attention, "all scored": score_every_token,
                "all-reduce": lambda: patched(engine.engine, "enable_backward_allreduce", True)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    bare = []
    for _ in range(args.steps):  # interleaved, so every variant sees the same load
        for name, variant in variants.items():
            with variant():
                runs[name].append(timed_step(engine, batch, objective))
        bare.append(bare_forward_backward(engine, batch, objective))
    others = [name for name in variants if name != "as is"]
    print(f"{'median per step':<18}{'as is':>9}" + "".join(f"{n:>11}{n + '/as is':>18}" for n in others)
          + "   (seconds; faults: count)")
    for key in (*PHASES, "cpu", "sys", "faults"):
        a = statistics.median(step[key] for step in runs["as is"])
        digits = 0 if key == "faults" else 3
        row = f"{key:<18}{a:>9.{digits}f}"
        for name in others:
            b = statistics.median(step[key] for step in runs[name])
            row += f"{b:>11.{digits}f}{b / a if a > 1e-3 else float('nan'):>18.2f}"
        print(row)
    total, bare_s = statistics.median(s["total"] for s in runs["as is"]), statistics.median(bare)
    print(f"bare forward+backward, no engine or optimizer: {bare_s:.3f} s; train step / bare = {total / bare_s:.2f}")


if __name__ == "__main__":
    main()
