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
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, mat in enumerate(matrices):
        buckets[tuple(mat.shape[-2:])].append(i)
    out: list[torch.Tensor] = [None] * len(matrices)  # type: ignore[list-item]
    for shape in sorted(buckets):
        slabs = [matrices[i] for i in buckets[shape]]
        result = _orthogonalize_bucket(slabs, shape, steps, dtype, group)
        offset = 0
        for i, slab in zip(buckets[shape], slabs):
            out[i] = result[offset : offset + slab.shape[0]]
            offset += slab.shape[0]
    return out


def _orthogonalize_bucket(slabs, shape, steps, dtype, group) -> torch.Tensor:
    """[sum b, n, m] NS results of the concatenated slabs; this rank computes rows [lo, hi) of it."""
    total = sum(s.shape[0] for s in slabs)
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    lo, hi = share_bounds(total, world, rank)
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
    return everything[:total]


def share_bounds(total: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of a same-shape batch of `total` matrices that `rank` of `world` orthogonalizes."""
    share = math.ceil(total / world)
    return min(rank * share, total), min((rank + 1) * share, total)


def _normalize_rows(slabs: list[torch.Tensor], lo: int, hi: int, into: torch.Tensor) -> None:
    """Normalize rows [lo, hi) of the virtual concatenation of `slabs` into `into` (cast to its dtype)."""
    start = 0
    for slab in slabs:
        a, b = max(lo, start), min(hi, start + slab.shape[0])
        if a < b:
            normalize_into(slab[a - start : b - start], into[a - lo : b - lo])
        start += slab.shape[0]
