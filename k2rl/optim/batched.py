"""Orthogonalize many matrices at once: same shapes in one batch, the batch split across ranks.

Every data-parallel rank holds the same momentum (ZeRO stage 0: gradients are all-reduced before the
step), so each rank orthogonalizes only its share of every same-shape batch and the results are
all-gathered, as in Moonlight's distributed Muon: each matrix is orthogonalized once, every rank
applies the same gathered bits, and the weights stay identical across ranks.
"""
from __future__ import annotations

import math
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
    out: list[torch.Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for bucket, (shape, members) in enumerate(same_shape_batches(matrices)):
        slabs = [matrices[i] for i in members]
        result = _orthogonalize_bucket(slabs, shape, steps, dtype, group, bucket)
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


def _orthogonalize_bucket(slabs, shape, steps, dtype, group, bucket: int) -> torch.Tensor:
    """[sum b, n, m] NS results of the concatenated slabs; this rank computes rows [lo, hi) of it."""
    total = sum(s.shape[0] for s in slabs)
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    lo, hi = share_bounds(total, world, rank, bucket)
    share = math.ceil(total / world)
    mine = torch.empty((share, *shape), dtype=dtype, device=slabs[0].device)
    _normalize_rows(slabs, lo, hi, mine)
    if world == 1:
        return newton_schulz(mine, steps)
    if hi > lo:
        mine[: hi - lo] = newton_schulz(mine[: hi - lo], steps)
    mine[hi - lo :].zero_()
    everything = torch.empty((world * share, *shape), dtype=dtype, device=mine.device)
    dist.all_gather_into_tensor(everything, mine, group=group)
    in_order = everything.view(world, share, *shape).roll(-(bucket % world), dims=0)  # chunk c came from rank c + bucket
    return in_order.reshape(world * share, *shape)[:total]


def share_bounds(total: int, world: int, rank: int, bucket: int = 0) -> tuple[int, int]:
    """Rows [lo, hi) of the `bucket`-th same-shape batch, of `total` matrices, that `rank` of `world`
    orthogonalizes. The batch's chunks start at rank `bucket`: a batch with fewer matrices than ranks
    (K2's dense layers, its attention projections at a large world) then lands on other ranks than the
    batch before it, rather than every such batch on rank 0."""
    share = math.ceil(total / world)
    chunk = (rank - bucket) % world
    return min(chunk * share, total), min((chunk + 1) * share, total)


def _normalize_rows(slabs: list[torch.Tensor], lo: int, hi: int, into: torch.Tensor) -> None:
    """Normalize rows [lo, hi) of the virtual concatenation of `slabs` into `into` (cast to its dtype)."""
    start = 0
    for slab in slabs:
        a, b = max(lo, start), min(hi, start + slab.shape[0])
        if a < b:
            normalize_into(slab[a - start : b - start], into[a - lo : b - lo])
        start += slab.shape[0]
