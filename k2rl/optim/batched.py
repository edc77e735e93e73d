"""Orthogonalize many matrices at once: same shapes in one batch, the batch split across ranks.

Every data-parallel rank holds the same momentum (ZeRO stage 0: gradients are all-reduced before the
step), so each rank orthogonalizes only its share of every same-shape batch and the results are
all-gathered, as in Moonlight's distributed Muon: each matrix is orthogonalized once, every rank
applies the same gathered bits, and the weights stay identical across ranks.

Shares are planned by cost, not count (`row_plan`): NS on an n x m matrix costs ~min(n,m)^2 max(n,m),
so one K2 attention output projection (7168 x 8192) costs as much as 14 expert matrices. Splitting
each batch evenly left the rank that drew it 1.6x over the ideal at 4 ranks (measured on the H200).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from k2rl.optim.newton_schulz import newton_schulz, normalize_into


def orthogonalize_all(
    matrices: list[torch.Tensor], steps: int, dtype: torch.dtype, group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """NS of each matrix in `matrices` (each [b, n, m]: b separate matrices); outputs match inputs' shapes.

    `group` is the data-parallel group to split the work over (None: this process does all of it).
    """
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    out: list[torch.Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for shape, members, rows in planned_batches(matrices, world):
        slabs = [matrices[i] for i in members]
        result = _orthogonalize_batch(slabs, shape, steps, dtype, group, rows, rank)
        offset = 0
        for i, slab in zip(members, slabs):
            out[i] = result[offset : offset + slab.shape[0]]
            offset += slab.shape[0]
    return out


def same_shape_batches(matrices: list[torch.Tensor]) -> list[tuple[tuple[int, int], list[int]]]:
    """(shape, indices of the matrices of that shape) per distinct matrix shape, in a fixed order."""
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, mat in enumerate(matrices):
        buckets[tuple(mat.shape[-2:])].append(i)
    return sorted(buckets.items())


def planned_batches(matrices: list[torch.Tensor], world: int) -> list[tuple[tuple[int, int], list[int], list[int]]]:
    """(shape, indices of the matrices of that shape, matrices per rank) per same-shape batch (`row_plan`)."""
    batches = same_shape_batches(matrices)
    plan = row_plan([(shape, sum(matrices[i].shape[0] for i in members)) for shape, members in batches], world)
    return [(shape, members, rows) for (shape, members), rows in zip(batches, plan)]


def ns_cost(shape: tuple[int, int]) -> int:
    """Leading-order matmul cost of Newton-Schulz on one matrix of `shape` (it works on the small side)."""
    small, large = sorted(shape)
    return small * small * large


def row_plan(batches: list[tuple[tuple[int, int], int]], world: int) -> list[list[int]]:
    """Per same-shape batch (shape, matrix count), how many of its matrices each rank orthogonalizes:
    costliest matrices first, each to the least-loaded rank so far (ties: the lowest rank), so every
    rank ends within one matrix's cost of the ideal. Deterministic: every rank plans the same."""
    load = [0] * world
    plan = [[0] * world for _ in batches]
    for b in sorted(range(len(batches)), key=lambda b: -ns_cost(batches[b][0])):
        shape, total = batches[b]
        for _ in range(total):
            rank = min(range(world), key=lambda r: load[r])
            plan[b][rank] += 1
            load[rank] += ns_cost(shape)
    return plan


def rank_rows(rows: list[int], rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch that `rank` takes under `rows` (ranks take consecutive rows in order)."""
    lo = sum(rows[:rank])
    return lo, lo + rows[rank]


def _orthogonalize_batch(slabs, shape, steps, dtype, group, rows: list[int], rank: int) -> torch.Tensor:
    """[sum b, n, m] NS results of the concatenated slabs; this rank computes its `rows` share of them."""
    lo, hi = rank_rows(rows, rank)
    share = max(rows)
    mine = torch.empty((share, *shape), dtype=dtype, device=slabs[0].device)
    _normalize_rows(slabs, lo, hi, mine)
    if len(rows) == 1:
        return newton_schulz(mine, steps)
    if hi > lo:
        mine[: hi - lo] = newton_schulz(mine[: hi - lo], steps)
    mine[hi - lo :].zero_()
    everything = torch.empty((len(rows) * share, *shape), dtype=dtype, device=mine.device)
    dist.all_gather_into_tensor(everything, mine, group=group)  # equal chunks: each padded to `share`
    chunks = everything.view(len(rows), share, *shape)
    return torch.cat([chunks[r, :count] for r, count in enumerate(rows)])


def _normalize_rows(slabs: list[torch.Tensor], lo: int, hi: int, into: torch.Tensor) -> None:
    """Normalize rows [lo, hi) of the virtual concatenation of `slabs` into `into` (cast to its dtype)."""
    start = 0
    for slab in slabs:
        a, b = max(lo, start), min(hi, start + slab.shape[0])
        if a < b:
            normalize_into(slab[a - start : b - start], into[a - lo : b - lo])
        start += slab.shape[0]
