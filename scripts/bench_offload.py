"""GPU benchmark: trainer offload/reload of k2-mini's full training state (bf16 weights, fp32 master,
AdamW moments) against a pinned host<->device copy of the same bytes in the same run.

For each mode (our persistent pinned buffers under ZeRO-1 and ZeRO-3; DeepSpeed's offload_states under
ZeRO-1): build the engine, take one training step so every state exists, then offload/reload 3 times.
Prints GB/s each way, the ratio to the pinned copy, the first call's time and what stays on the GPU,
and checks the logprobs after a round trip are bitwise the ones before.

Run on the GPU machine (no Ray/vLLM needed): python scripts/bench_offload.py [--modes zero1-pinned,...]
"""
from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import traceback

import torch

GiB = 1 << 30


def pinned_copy_baseline(nbytes: int, chunk: int = 4 * GiB, reps: int = 3) -> tuple[float, float]:
    """GB/s of moving `nbytes` device->pinned host and back, as plain copies of one contiguous chunk
    (repeated to cover `nbytes`; best of `reps`). Chunked so the baseline does not double host memory."""
    chunk = min(chunk, nbytes)
    dev = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    d2h, h2d = [], []
    for _ in range(reps):
        for dst, src, out in ((host, dev, d2h), (dev, host, h2d)):
            torch.cuda.synchronize(); t = time.perf_counter()
            left = nbytes
            while left > 0:
                n = min(chunk, left)
                dst[:n].copy_(src[:n], non_blocking=True)
                left -= n
            torch.cuda.synchronize(); out.append(time.perf_counter() - t)
    del dev, host
    torch.cuda.empty_cache()
    return nbytes / min(d2h) / 1e9, nbytes / min(h2d) / 1e9


def leftovers(top: int = 5) -> list[tuple[int, tuple]]:
    """The largest CUDA tensors still alive (to explain what an offload left behind)."""
    seen = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.is_cuda and obj.untyped_storage().nbytes() > 0:
                seen[obj.untyped_storage().data_ptr()] = (obj.untyped_storage().nbytes(), tuple(obj.shape))
        except Exception:  # noqa: BLE001 - objects mid-teardown
            pass
    return sorted(seen.values(), reverse=True)[:top]


def build_engine(stage: int, offload: str, seq_len: int):
    from transformers import DeepseekV3Config

    from k2rl.config import JobConfig
    from k2rl.engines.train import TrainEngine
    from k2rl.model.modeling import build_model
    from k2rl.model.presets import preset_config

    model = build_model(DeepseekV3Config(**preset_config("k2-mini")), torch.bfloat16, seed=0)  # host; DeepSpeed moves it
    job = JobConfig(optimizer={"name": "adamw", "lr": 1e-5},
                    train={"zero_stage": stage, "offload": offload, "micro_batch_tokens": seq_len * 2,
                           "gradient_checkpointing": True})
    return TrainEngine("unused-k2-mini", job, model=model)


def bench_mode(mode: str, seq_len: int, cycles: int) -> dict:
    from k2rl.engines.types import TokenBatch

    stage, offload = int(mode[4]), mode.split("-")[1]
    engine = build_engine(stage, offload, seq_len)
    gen = torch.Generator().manual_seed(0)
    batch = TokenBatch.from_lists(torch.randint(2, 30000, (4, seq_len), generator=gen).tolist())
    loss_fn = lambda lps, b: (-(torch.cat(lps) * torch.cat(b.loss_mask)).mean(), {})  # noqa: E731
    engine.train_step(batch, loss_fn)
    probe = TokenBatch.from_lists(batch.input_ids[0][:256].unsqueeze(0).tolist())
    before = engine.logprobs(probe)[0]
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    state_bytes = held  # everything allocated now is training state (activations are freed)
    if engine.offloader is not None:
        from k2rl.engines.offload import device_storages
        state_bytes = sum(s.nbytes() for s in device_storages(engine.engine))
    times = {"offload": [], "reload": []}
    after_offload = []
    for _ in range(cycles):
        torch.cuda.synchronize(); t = time.perf_counter()
        engine.offload(); times["offload"].append(time.perf_counter() - t)
        after_offload.append(torch.cuda.memory_allocated())
        t = time.perf_counter()
        engine.reload(); times["reload"].append(time.perf_counter() - t)
    after = engine.logprobs(probe)[0]
    engine.offload()
    left = leftovers()
    engine.reload()
    d2h, h2d = pinned_copy_baseline(state_bytes)
    steady_off = min(times["offload"][1:]) if cycles > 1 else times["offload"][0]
    steady_on = min(times["reload"][1:]) if cycles > 1 else times["reload"][0]
    result = dict(mode=mode, state_gib=state_bytes / GiB, allocated_gib=held / GiB,
                  first_offload_s=times["offload"][0], first_reload_s=times["reload"][0],
                  offload_gbps=state_bytes / steady_off / 1e9, reload_gbps=state_bytes / steady_on / 1e9,
                  pinned_d2h_gbps=d2h, pinned_h2d_gbps=h2d,
                  held_after_offload_gib=max(after_offload) / GiB, bitwise_same=bool(torch.equal(before, after)),
                  leftovers=[(round(n / GiB, 3), shape) for n, shape in left])
    result["offload_vs_pinned"] = result["offload_gbps"] / d2h
    result["reload_vs_pinned"] = result["reload_gbps"] / h2d
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="zero1-pinned,zero3-pinned,zero1-deepspeed")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--one", action="store_true", help="run the single mode given here (internal)")
    args = parser.parse_args()
    if not args.one:  # each mode in its own process: a mode's GPU and pinned memory cannot leak into the next
        for i, mode in enumerate(args.modes.split(",")):
            subprocess.run([sys.executable, __file__, "--one", "--modes", mode, "--seq-len", str(args.seq_len),
                            "--cycles", str(args.cycles)], env={**os.environ, "MASTER_PORT": str(29511 + i)})
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    mode, start = args.modes, time.perf_counter()
    try:
        r = bench_mode(mode, args.seq_len, args.cycles)
    except Exception as e:  # noqa: BLE001 - report, the next mode still runs
        print(f"{mode}: FAILED {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        return
    print(f"{mode}: state {r['state_gib']:.2f} GiB | offload {r['offload_gbps']:.1f} GB/s "
          f"= {r['offload_vs_pinned']:.0%} of pinned {r['pinned_d2h_gbps']:.1f} | reload {r['reload_gbps']:.1f} GB/s "
          f"= {r['reload_vs_pinned']:.0%} of pinned {r['pinned_h2d_gbps']:.1f} | first offload {r['first_offload_s']:.2f}s "
          f"reload {r['first_reload_s']:.2f}s | held after offload {r['held_after_offload_gib']:.3f} GiB | "
          f"round trip bitwise {r['bitwise_same']} | {time.perf_counter() - start:.0f}s", flush=True)
    print(f"  detail: {r}", flush=True)


if __name__ == "__main__":
    main()
