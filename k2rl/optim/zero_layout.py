"""Where each parameter's elements sit in the flat fp32 partitions DeepSpeed ZeRO hands an optimizer.

ZeRO 1/2 flatten a param group into one buffer (params in order, alignment padding between them)
and give rank r the contiguous slice [r P, (r+1) P). ZeRO 3 partitions each parameter on its own:
rank r holds elements [r c, (r+1) c) of every flattened parameter (c = ceil(numel / N), the last
chunk zero-padded), and its flat partition is those chunks back to back. Either way every rank's
partition has the same length L, and a `ShardLayout` says which of its elements belong to which
parameter. MuonClip uses it to assemble whole matrices for Newton-Schulz a bucket at a time (one
all-gather of every rank's pieces of just those), and to take back its own part of the result;
QK-Clip uses it to find the master-weight elements of a q/k projection row.

A bucket is a list of `Unit`s: each a contiguous element range of one parameter that covers whole
matrices (the last two dims): all of a 2-D parameter, or a run of experts [e0, e1) of an [E, R, C]
stack, elements [e0 R C, e1 R C). So a fused expert stack larger than the bucket is gathered a few
experts at a time, never whole (though the all-gather's padding can be: see `gather`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Piece:
    """Elements [start, end) of a flattened parameter stored at `offset` in a rank's flat partition."""

    start: int
    end: int
    offset: int


@dataclass(frozen=True)
class Unit:
    """Elements [start, end) of flattened parameter `index`: whole matrices of it."""

    index: int
    start: int
    end: int


class ShardLayout:
    """One flat partition: its parameters (in the wrapper's order), their full shapes, and for every
    rank the pieces of each parameter that rank holds."""

    def __init__(self, params: list[torch.Tensor], shapes: list[torch.Size], length: int,
                 pieces: list[list[list[Piece]]], group: dist.ProcessGroup | None, rank: int):
        self.params, self.shapes, self.length, self.group, self.rank = params, shapes, length, group, rank
        self.pieces = pieces  # pieces[rank][param index]
        self.index = {id(p): i for i, p in enumerate(params)}

    def buckets(self, max_numel: int) -> list[list[Unit]]:
        """Every parameter's elements in order, in buckets of at most `max_numel` elements of whole
        matrices (a larger matrix is a bucket alone): what `gather` brings at once, so no rank holds
        more of the group's update whole. A stack is cut between experts where a bucket fills."""
        runs, size = [[]], 0
        for i, shape in enumerate(self.shapes):
            numel, matrix = math.prod(shape), math.prod(shape[-2:])
            start = 0
            while start < numel:
                fits = (max_numel - size) // matrix * matrix
                if fits <= 0 and runs[-1]:
                    runs.append([])
                    size = 0
                    continue
                end = min(numel, start + max(fits, matrix))
                runs[-1].append(Unit(i, start, end))
                size, start = size + end - start, end
        return runs if runs[-1] else []

    def gather(self, local: torch.Tensor, units: list[Unit]) -> list[torch.Tensor]:
        """Each unit's elements from every rank's partition (`local`: this rank's, [L]), as its matrices
        [count, R, C]. One all-gather of each rank's pieces of just those ranges, padded to the largest
        rank's count: the receive buffer is N x that, about the bucket only when every rank holds an
        equal share (ZeRO 3's whole parameters), up to N x it when one rank holds it all."""
        world = len(self.pieces)
        held = [[self._held(rank, unit) for unit in units] for rank in range(world)]  # [rank][unit] -> pieces
        counts = [sum(pc.end - pc.start for pcs in row for pc in pcs) for row in held]
        mine = local.new_zeros(max(counts))
        pos = 0
        for pcs in held[self.rank]:
            for pc in pcs:
                mine[pos:pos + pc.end - pc.start] = local[pc.offset:pc.offset + pc.end - pc.start]
                pos += pc.end - pc.start
        everything = local.new_empty(world * mine.numel())
        dist.all_gather_into_tensor(everything, mine, group=self.group)
        parts, cursor = everything.view(world, mine.numel()), [0] * world
        out = []
        for k, unit in enumerate(units):
            whole = local.new_empty(unit.end - unit.start)
            for rank in range(world):
                for pc in held[rank][k]:
                    n = pc.end - pc.start
                    whole[pc.start - unit.start:pc.end - unit.start] = parts[rank, cursor[rank]:cursor[rank] + n]
                    cursor[rank] += n
            out.append(whole.view(-1, *self.shapes[unit.index][-2:]))
        return out

    def local(self, whole: list[torch.Tensor], units: list[Unit], out: torch.Tensor) -> None:
        """Write this rank's elements of `units` (`whole`: each unit's elements, any shape) into its
        partition `out` [L]; other elements are left as they are."""
        for unit, tensor in zip(units, whole):
            flat = tensor.reshape(-1)
            for pc in self._held(self.rank, unit):
                out[pc.offset:pc.offset + pc.end - pc.start] = flat[pc.start - unit.start:pc.end - unit.start]

    def _held(self, rank: int, unit: Unit) -> list[Piece]:
        """`rank`'s pieces of the parameter cut to the unit's range (start, end: in the parameter)."""
        cut = []
        for pc in self.pieces[rank][unit.index]:
            a, b = max(pc.start, unit.start), min(pc.end, unit.end)
            if a < b:
                cut.append(Piece(a, b, pc.offset + a - pc.start))
        return cut

    def local_pieces(self, param: torch.Tensor) -> list[Piece]:
        return self.pieces[self.rank][self.index[id(param)]]


def zero_layouts(ds_optimizer) -> list[tuple[torch.Tensor, ShardLayout]]:
    """(flat fp32 partition, its layout) for each partition of a DeepSpeed ZeRO 1/2
    (`DeepSpeedZeroOptimizer`) or ZeRO 3 optimizer: the tensors the client optimizer is handed."""
    if hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):
        return [(flat, _zero3_layout(ds_optimizer, sub)) for sub, flat in enumerate(ds_optimizer.fp32_partitioned_groups_flat)]
    if hasattr(ds_optimizer, "single_partition_of_fp32_groups"):
        return [(flat, _zero12_layout(ds_optimizer, i)) for i, flat in enumerate(ds_optimizer.single_partition_of_fp32_groups)]
    raise TypeError(f"not a DeepSpeed ZeRO 1/2/3 optimizer: {type(ds_optimizer).__name__}")


def _zero12_layout(ds_optimizer, i: int) -> ShardLayout:
    """Params at `round_robin_bit16_offsets` in the group's flat buffer; rank r owns [r P, (r+1) P)."""
    group = ds_optimizer.real_dp_process_group[i]
    params = ds_optimizer.round_robin_bit16_groups[i]
    shapes = [m.shape for m in ds_optimizer.round_robin_bit16_meta[i]]
    offsets = ds_optimizer.round_robin_bit16_offsets[i]
    size = ds_optimizer.partition_size[i]
    pieces = []
    for rank in range(dist.get_world_size(group)):
        lo, hi = rank * size, (rank + 1) * size
        row = []
        for shape, offset in zip(shapes, offsets):
            a, b = max(lo, offset), min(hi, offset + math.prod(shape))
            row.append([Piece(a - offset, b - offset, a - lo)] if a < b else [])
        pieces.append(row)
    return ShardLayout(list(params), shapes, size, pieces, group, dist.get_rank(group))


def _zero3_layout(ds_optimizer, sub: int) -> ShardLayout:
    """Each param's chunk r (ds_tensor) back to back in the sub-group's partition, in `fp16_groups` order."""
    params = ds_optimizer.fp16_groups[sub]
    group = ds_optimizer._get_sub_group_process_group(sub)
    shapes = [p.ds_shape for p in params]
    chunks = [p.partition_numel() for p in params]
    pieces = []
    for rank in range(dist.get_world_size(group)):
        row, offset = [], 0
        for shape, chunk in zip(shapes, chunks):
            a, b = rank * chunk, min((rank + 1) * chunk, math.prod(shape))
            row.append([Piece(a, b, offset)] if a < b else [])
            offset += chunk
        pieces.append(row)
    return ShardLayout(list(params), shapes, sum(chunks), pieces, group, dist.get_rank(group))
