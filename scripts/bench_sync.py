"""CPU benchmark: trainer -> vLLM weight sync (the worker's own `sync_weights`: bucketed export from a
DeepSpeed engine streamed into vLLM's in-place reload) against a plain copy of the same bytes, in the
same run, for k2-tiny and a ~93M-parameter K2-shaped model. Then the routed experts' pass a GPU
engine takes (k2rl.engines.expert_copy, which vLLM-CPU cannot: it re-packs its experts): the
trainer's fp32 stacks copied and cast into bf16 tensors laid out as vLLM's GPU kernel holds them,
for rank 0 of a TP 1, 2 and 4 engine, against the bucketed per-expert bf16 export the experts
would otherwise leave the trainer in (before vLLM's loaders even start) and a plain copy.

    python scripts/bench_sync.py [--bucket-mb 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# One OpenMP thread, as in a Ray worker actor with num_cpus=1: with a thread per core, each of vLLM's
# ~1000 small per-expert copies waits for a busy core (measured 6x slower sync on a loaded 2-core host).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import DeepseekV3Config  # noqa: E402

from k2rl.config import JobConfig  # noqa: E402
from k2rl.engines.rollout import RolloutEngine  # noqa: E402
from k2rl.engines.train import TrainEngine  # noqa: E402
from k2rl.engines.expert_copy import copy_experts, expert_buffers  # noqa: E402
from k2rl.engines.types import is_routed_expert  # noqa: E402
from k2rl.engines.world import single_rank_world  # noqa: E402
from k2rl.model.build import make_model  # noqa: E402
from k2rl.model.checkpoint import save_model  # noqa: E402
from k2rl.model.modeling import build_model  # noqa: E402
from k2rl.model.presets import preset_config  # noqa: E402
from k2rl.worker import sync_weights  # noqa: E402

# k2-tiny scaled up to ~93M parameters; vLLM-CPU's MLA ranks (512 / 64) kept.
K2_100M = dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=6,
               num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32, num_experts_per_tok=4,
               q_lora_rank=256, qk_nope_head_dim=64, v_head_dim=64, vocab_size=16384)


def write_models(root: Path) -> dict[str, Path]:
    tiny = make_model("k2-tiny", root / "k2-tiny", seed=0)
    big = root / "k2-100m"
    save_model(build_model(DeepseekV3Config(**dict(preset_config("k2-tiny"), **K2_100M)), seed=0), big)
    for f in tiny.glob("*token*"):  # the tiny tokenizer's ids fit the larger vocabulary
        shutil.copy(f, big / f.name)
    return {"k2-tiny": tiny, "k2-100m": big}


def best_of(repeats: int, run) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def plain_copy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    return best_of(repeats, lambda: dst.copy_(src))


def vllm_like_experts(train: TrainEngine, tp_size: int) -> dict[str, SimpleNamespace]:
    """Per MoE layer, rank 0's bf16 `w13_weight` [E, 2I/T, H] and `w2_weight` [E, H, I/T], as vLLM's
    unquantized GPU kernel holds them."""
    targets = {}
    for name, stack in train.expert_stacks():
        if name.endswith("down_proj"):
            experts, hidden, inter = stack.shape
            targets[name.rsplit(".", 1)[0]] = expert_buffers(experts, hidden, inter, 0, tp_size)
    return targets


def bench(name: str, model_dir: Path, bucket_bytes: int, repeats: int) -> None:
    job = JobConfig(optimizer={"name": "adamw"}, train={"zero_stage": 1})
    train = TrainEngine(model_dir, job)
    rollout = RolloutEngine(model_dir, max_model_len=512)
    runs = [sync_weights(train, rollout, bucket_bytes) for _ in range(repeats + 1)][1:]  # first: warm-up
    nbytes, seconds = runs[0][0], min(s for _, s in runs)
    copy = plain_copy_seconds(nbytes, repeats)
    params = sum(p.numel() for p in train.model.parameters())
    print(f"{name}: {params / 1e6:.1f}M params, {nbytes / 1e6:.0f} MB | sync {seconds * 1e3:.0f} ms = "
          f"{nbytes / seconds / 1e9:.2f} GB/s | plain copy {copy * 1e3:.1f} ms = {nbytes / copy / 1e9:.2f} GB/s | "
          f"sync / copy = {seconds / copy:.1f}x", flush=True)
    export_s = best_of(repeats, lambda: sum(1 for _ in train.export_weights(bucket_bytes, torch.bfloat16, is_routed_expert)))
    parts = [f"{name} routed experts to bf16: bucketed per-expert export {export_s * 1e3:.1f} ms"]
    for tp_size in (1, 2, 4):
        targets = vllm_like_experts(train, tp_size)
        nbytes = copy_experts(targets, train.expert_stacks())
        secs = best_of(repeats, lambda: copy_experts(targets, train.expert_stacks()))
        copy = plain_copy_seconds(nbytes, repeats)
        parts.append(f"direct copy TP {tp_size} rank 0: {nbytes / 1e6:.1f} MB {secs * 1e3:.1f} ms = "
                     f"{nbytes / secs / 1e9:.2f} GB/s (export / direct {export_s / secs:.1f}x, direct / plain copy "
                     f"{secs / copy:.1f}x)")
    print(" | ".join(parts), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    single_rank_world()
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_dir in write_models(Path(tmp)).items():
            bench(name, model_dir, args.bucket_mb << 20, args.repeats)


if __name__ == "__main__":
    main()
