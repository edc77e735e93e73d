"""vLLM's sampling of seeded requests, batched: one kernel draws every seeded row's noise.

Why: k2rl seeds every rollout request, so that a resumed run samples what the uninterrupted one did and
a request samples the same whatever else shares its batch. vLLM (0.26) draws a seeded request's noise
with that request's own torch.Generator, one `exponential_` per request and decoding step
(`vllm.v1.sample.ops.topk_topp_sampler.random_sample`, which says "This can be slow"): 256 launches a
step for 256 rollouts. Here each seeded row's Exp(1) noise is Philox keyed by the request's seed,
counting the draws the request has kept, all rows in one Triton kernel. The draws differ from stock
vLLM's for the same seed; both promises hold.

The count lives in a `DrawLedger`, not in the generator's offset as vLLM's own draws keep it: reading
and moving a CUDA generator's offset are a host call each, each asking CUDA whether a graph is being
captured; read, moved and its seed taken for 256 rows, they cost 0.74 ms of every decoding step's host
time (scripts/bench_seeded_sampling.py, H100, 2026-12-07).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

_OFFSET_STEP = 4  # a CUDA generator's Philox offset moves in multiples of 4
_STOCK_RANDOM_SAMPLE = None  # vLLM's own, once `patch_seeded_sampling` has replaced it


@functools.cache
def _kernel():
    """Built on first use, so that TRITON_INTERPRET (the CPU tests) is read when it is set."""
    import triton
    import triton.language as tl

    @triton.jit
    def exponential_rows(q_ptr, q_stride, rows_ptr, seeds_ptr, draws_ptr, columns, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        row = tl.load(rows_ptr + i)
        seed = tl.load(seeds_ptr + i)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        counter = tl.zeros_like(cols) + tl.load(draws_ptr + i).to(tl.int32)
        bits, _, _, _ = tl.philox(seed, cols, counter, tl.zeros_like(cols), tl.zeros_like(cols))
        uniform = tl.maximum(tl.uint_to_uniform_float(bits), 4.6566127342e-10)  # its least above 0: -log stays finite
        tl.store(q_ptr + row * q_stride + cols, -tl.log(uniform), mask=cols < columns)

    return exponential_rows


def exponential_rows(q: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor, draws: torch.Tensor,
                     block: int = 4096) -> None:
    """Fill q[rows[i]] (q: float32 [R, C], contiguous rows) with Exp(1) noise that depends on
    (seeds[i], draws[i]) and the column alone; the other rows are left as they are."""
    if q.dtype != torch.float32 or q.stride(1) != 1:
        raise ValueError(f"exponential_rows fills float32 rows of unit stride, got {q.dtype} {tuple(q.stride())}")
    if len(rows):
        _kernel()[(len(rows), -(-q.shape[1] // block))](q, q.stride(0), rows, seeds, draws, q.shape[1], BLOCK=block)


def seeded_random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator],
                         use_fp64_gumbel: bool = False) -> torch.Tensor:
    """vLLM's `random_sample` (exponential-race sampling of each row of `probs`), with the rows that
    have a generator drawn in one kernel; each such request's draw count moves on by one (`DrawLedger`)."""
    from vllm.v1.sample.ops import topk_topp_sampler as stock

    if not generators or use_fp64_gumbel or probs.dtype != torch.float32:
        return (_STOCK_RANDOM_SAMPLE or stock.random_sample)(probs, generators, use_fp64_gumbel)
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        q.exponential_()
    exponential_rows(q, *draw_table(generators, probs.device))
    return stock.sample_with_exponential_noise(probs, q)


class DrawLedger:
    """Each seeded request's seed and kept draws, by row of vLLM's batch. While a request may still be
    in a partial prefill, vLLM throws its sampled token away and takes the draw back by rewinding the
    generator's offset (`gpu_model_runner`: `gen.set_offset(gen.get_offset() - 4)`). So a generator
    new to its row (new, moved, or back after being unscheduled or preempted: it may prefill again)
    keeps its count in its offset, read before each draw and moved on after it, until a draw stands;
    from then on (decoding: vLLM takes no draw back) the count is kept here alone, and written to the
    offset when the generator moves or leaves the batch, so the offset holds it whenever it is away."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[torch.Generator, _Count]] = {}  # each row's generator at the last step

    def draw_table(self, generators: dict[int, torch.Generator], device: torch.device | str) -> torch.Tensor:
        """The seeded rows' (row, seed, draw) as an int64 [3, R] tensor on `device`; each row's count
        moves on by one draw."""
        rows, seeds, draws = [], [], []
        placed = {}
        last_rows = None  # the last step's counts by generator, once a row has changed
        for row, generator in generators.items():
            last = self._rows.get(row)
            if last is None or last[0] is not generator:
                if last_rows is None:
                    last_rows = {id(g): count for g, count in self._rows.values()}
                count = self._join(generator, last_rows.get(id(generator)))
            else:
                count = last[1]
                if count.watched:  # the offset holds the count: did vLLM take the last draw back?
                    kept = generator.get_offset() // _OFFSET_STEP
                    count.watched = kept < count.draws  # taken back: still prefilling, it may be again
                    count.draws = kept
            rows.append(row)
            seeds.append(count.seed)
            draws.append(count.draws)
            count.draws += 1
            if count.watched:
                generator.set_offset(count.draws * _OFFSET_STEP)
            placed[row] = (generator, count)
        if last_rows is not None or len(placed) < len(self._rows):
            self._leave(placed)
        self._rows = placed
        table = torch.from_numpy(np.array([rows, seeds, draws], dtype=np.int64))  # 3x torch.tensor's speed
        return table.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else table

    def _join(self, generator: torch.Generator, moved: _Count | None) -> _Count:
        """The count of a generator new to its row, watched from now on (its offset holds the count):
        moved from another row, the count it had there; new or back, the count its offset holds."""
        if moved is None:
            return _Count(_signed64(generator.initial_seed()), generator.get_offset() // _OFFSET_STEP)
        if moved.watched:
            moved.draws = generator.get_offset() // _OFFSET_STEP
        else:
            generator.set_offset(moved.draws * _OFFSET_STEP)
            moved.watched = True
        return moved

    def _leave(self, placed: dict[int, tuple[torch.Generator, _Count]]) -> None:
        """Write the counts of the generators that left the batch since the last step to their offsets
        (one that moved rows is watched again: `_join` wrote its count)."""
        for row, (generator, count) in self._rows.items():
            if placed.get(row, (None,))[0] is not generator and not count.watched:
                generator.set_offset(count.draws * _OFFSET_STEP)


class _Count:
    __slots__ = ("seed", "draws", "watched")

    def __init__(self, seed: int, draws: int) -> None:
        self.seed, self.draws, self.watched = seed, draws, True


_LEDGER = DrawLedger()  # vLLM's engine samples in this process; one ledger serves its batches


def draw_table(generators: dict[int, torch.Generator], device: torch.device | str) -> torch.Tensor:
    """`DrawLedger.draw_table` of this process's ledger: the host's share of a step's seeded sampling."""
    return _LEDGER.draw_table(generators, device)


def _signed64(seed: int) -> int:
    """A generator's seed (uint64) as the int64 with the same bits."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def patch_seeded_sampling() -> bool:
    """Route vLLM's GPU sampler through `seeded_random_sample` (in this process; the engine runs in it);
    returns True, as `patch_routing_at_finish` returns whether it applied: this one applies to every vLLM."""
    global _STOCK_RANDOM_SAMPLE
    from vllm.v1.sample.ops import topk_topp_sampler as stock

    if _STOCK_RANDOM_SAMPLE is None:
        _STOCK_RANDOM_SAMPLE = stock.random_sample
        stock.random_sample = seeded_random_sample
    return True
