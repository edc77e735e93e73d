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
experts at a time, never whole. The all-gather pads every rank's share to the largest, so `buckets`
balances them: each rank holds at most 1/N of a bucket, and the receive buffer stays within it
(unless one rank holds more than that of a single matrix: then N x that share).
"""
from __future__ import annotations

import math
from collections import Counter, deque
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
        self._plans: dict[int, list[list[Unit]]] = {}  # max_numel -> buckets

    def buckets(self, max_numel: int) -> list[list[Unit]]:
        """Every matrix of every parameter once, in buckets of at most `max_numel` elements (or one
        matrix) whose all-gather, N x the largest rank's share of the bucket (`gather`), receives at
        most `max_numel` too: no rank holds more than max_numel / N of a bucket. Where one rank holds
        more than that of a single matrix, that matrix's bucket receives N x its share (no plan can do
        less) and fills the padding with other ranks' matrices, up to max_numel elements in all.

        Units are cut to at most max_numel / N elements on any rank (at least one matrix) and queued
        under the rank holding most of each; a bucket takes the next unit of each rank's queue in turn
        while it stays within both bounds, so it draws its elements from all ranks about equally.
        The plan depends only on the shapes and pieces (every rank makes the same, as `gather` needs)
        and is cached: MuonClip asks every step."""
        if max_numel in self._plans:
            return self._plans[max_numel]
        world = len(self.pieces)
        cap = max_numel // world
        queues = [deque() for _ in range(world)]
        for unit, share in self._units(cap):
            queues[max(sorted(share), key=share.get, default=0)].append((unit, share))
        plan, turn = [], 0
        while any(queues):
            bucket, load, size, limit, taken = [], Counter(), 0, cap, True
            while taken:
                taken = False
                for q in range(turn, turn + world):
                    queue = queues[q % world]
                    if not queue:
                        continue
                    unit, share = queue[0]
                    grown = max([limit, *share.values()])  # a matrix over the cap: its share sets the buffer
                    if bucket and (size + unit.end - unit.start > max_numel
                                   or any(load[r] + n > grown for r, n in share.items())):
                        continue
                    queue.popleft()
                    bucket.append(unit)
                    load.update(share)
                    size, limit, turn, taken = size + unit.end - unit.start, grown, q + 1, True
            plan.append(bucket)
        self._plans[max_numel] = plan
        return plan

    def _units(self, cap: int):
        """(unit, {rank: its elements of the unit}) for every parameter in order: runs of whole matrices
        of at most `cap` elements on any rank, or one matrix that alone has more."""
        for i, shape in enumerate(self.shapes):
            numel, matrix = math.prod(shape), math.prod(shape[-2:])
            spans = sorted((pc.start, pc.end, rank) for rank, row in enumerate(self.pieces) for pc in row[i])
            start, share, k = 0, Counter(), 0
            for lo in range(0, numel, matrix):
                hi = lo + matrix
                while k < len(spans) and spans[k][1] <= lo:
                    k += 1
                mat, j = Counter(), k
                while j < len(spans) and spans[j][0] < hi:
                    a, b, rank = spans[j]
                    mat[rank] += min(b, hi) - max(a, lo)
                    j += 1
                if share and max((share + mat).values()) > cap:
                    yield Unit(i, start, lo), share
                    start, share = lo, Counter()
                share += mat
            if numel:
                yield Unit(i, start, numel), share

    def gather(self, local: torch.Tensor, units: list[Unit]) -> list[torch.Tensor]:
        """Each unit's elements from every rank's partition (`local`: this rank's, [L]), as its matrices
        [count, R, C]. One all-gather of each rank's pieces of just those ranges, padded to the largest
        rank's count: the receive buffer is N x that, within the bucket for a bucket of `buckets` (or N x
        one matrix's largest share, where that is more)."""
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
    shapes = [m.shape for m in ds_optimizer.round_robin_bit16_meta[i]]
    size = ds_optimizer.partition_size[i]
    pieces = zero12_pieces(shapes, ds_optimizer.round_robin_bit16_offsets[i], size, dist.get_world_size(group))
    return ShardLayout(list(ds_optimizer.round_robin_bit16_groups[i]), shapes, size, pieces, group,
                       dist.get_rank(group))


def _zero3_layout(ds_optimizer, sub: int) -> ShardLayout:
    """Each param's chunk r (ds_tensor) back to back in the sub-group's partition, in `fp16_groups` order."""
    params = ds_optimizer.fp16_groups[sub]
    group = ds_optimizer._get_sub_group_process_group(sub)
    shapes = [p.ds_shape for p in params]
    chunks = [p.partition_numel() for p in params]
    pieces = zero3_pieces(shapes, chunks, dist.get_world_size(group))
    return ShardLayout(list(params), shapes, sum(chunks), pieces, group, dist.get_rank(group))


def zero12_pieces(shapes: list[torch.Size], offsets: list[int], size: int, world: int) -> list[list[list[Piece]]]:
    """ZeRO 1/2: parameters at `offsets` in one flat buffer; rank r holds its slice [r size, (r+1) size)."""
    pieces = []
    for rank in range(world):
        lo, hi = rank * size, (rank + 1) * size
        row = []
        for shape, offset in zip(shapes, offsets):
            a, b = max(lo, offset), min(hi, offset + math.prod(shape))
            row.append([Piece(a - offset, b - offset, a - lo)] if a < b else [])
        pieces.append(row)
    return pieces


def zero3_pieces(shapes: list[torch.Size], chunks: list[int], world: int) -> list[list[list[Piece]]]:
    """ZeRO 3: rank r holds elements [r c, (r+1) c) of each parameter (c its chunk), chunks back to back."""
    pieces = []
    for rank in range(world):
        row, offset = [], 0
        for shape, chunk in zip(shapes, chunks):
            a, b = rank * chunk, min((rank + 1) * chunk, math.prod(shape))
            row.append([Piece(a, b, offset)] if a < b else [])
            offset += chunk
        pieces.append(row)
    return pieces
