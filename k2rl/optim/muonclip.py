"""MuonClip's optimizer half: Muon (Nesterov momentum, NS5, RMS matched to AdamW, decoupled weight
decay) for weight matrices and AdamW for the rest, one lr and wd for both (K2 report, Algorithm 1).
QK-Clip, the other half, runs after `step()` (`k2rl.optim.qk_clip`).

DeepSpeed, any ZeRO stage, fp32 parameters (compute in bf16 through autocast if wanted):
- Stage 0: DeepSpeed all-reduces gradients and calls `step()` with the real parameters on every
  rank. Each rank updates the momentum (elementwise, cheap), orthogonalizes only its share of the
  matrices and all-gathers the results (`k2rl.optim.batched`), so every rank applies identical bits.
- Stages 1/2/3: DeepSpeed hands `step()` flat fp32 partitions (1/N of the state per rank), and
  `attach_zero(ds_optimizer)` tells MuonClip which elements of which parameter each partition holds
  (`k2rl.optim.zero_layout`). The momentum stays in the partition (elementwise, 1/N); the Nesterov
  update is all-gathered into whole matrices, `bucket_numel` elements at a time (what bounds the
  transient whole-matrix memory on every rank; a fused expert stack comes a run of experts at a time),
  each matrix is orthogonalized once on one rank (the same split as stage 0), and each rank keeps its
  own elements of the result for its master partition.
  QK-Clip then scales the master partition too (`scale_weight`), or DeepSpeed would copy it back.
- The parameters must be fp32: they are the master weights, and QK-Clip rescales them in place.
  DeepSpeed's bf16/fp16 wrappers would keep private fp32 copies that QK-Clip cannot see.
State (momentum, AdamW moments) is ordinary per-parameter optimizer state: `state_dict()` checkpoints
it, `k2rl.optim.state.move_optimizer_state` offloads and reloads it.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

from k2rl.optim.batched import orthogonalize_all
from k2rl.optim.zero_layout import ShardLayout, zero_layouts


class MuonClip(torch.optim.Optimizer):
    """The momentum buffer holds (1 - mu) M_t (an EMA, as in Keller Jordan's Muon), which NS normalizes away.

    Param groups with `use_muon=True` carry `matrix_rows`: for each parameter, the rows of one of its
    matrices (a [E, 2I, H] gate_up stack has rows I: gate and up are separate matrices, as in the
    checkpoint); the parameter is viewed as [-1, rows, cols] and each slice is orthogonalized alone."""

    def __init__(
        self,
        param_groups: list[dict],
        lr: float,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float16,
        group: dist.ProcessGroup | None = None,
        bucket_numel: int = 1 << 28,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, betas=betas,
                        eps=eps, ns_steps=ns_steps, use_muon=False)
        super().__init__(param_groups, defaults)
        for group_ in self.param_groups:
            for p in group_["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"MuonClip updates fp32 master weights in place; got a {p.dtype} parameter "
                                     "(keep the model in fp32 under DeepSpeed and compute in bf16 with autocast)")
            if group_["use_muon"] and len(group_["matrix_rows"]) != len(group_["params"]):
                raise ValueError("a use_muon group needs one matrix_rows entry per parameter")
        self.ns_dtype = ns_dtype
        self.dp_group = group
        self.bucket_numel = bucket_numel
        self.matrix_rows = {id(p): rows for g in self.param_groups if g["use_muon"]
                            for p, rows in zip(g["params"], g["matrix_rows"])}
        self.partitions: dict[int, tuple[torch.Tensor, ShardLayout]] = {}  # id(flat partition) -> it, layout
        self.master_of: dict[int, tuple[torch.Tensor, ShardLayout]] = {}  # id(model param) -> the same

    def attach_zero(self, ds_optimizer) -> None:
        """Learn the flat fp32 partitions of DeepSpeed's ZeRO 1/2/3 wrapper around this optimizer
        (call once, after `deepspeed.initialize`)."""
        for flat, layout in zero_layouts(ds_optimizer):
            self.partitions[id(flat)] = (flat, layout)
            self.master_of.update({id(p): (flat, layout) for p in layout.params})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon_step if group["use_muon"] else self._adamw_step)(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        if any(id(p) in self.partitions for p in group["params"]):
            for flat in group["params"]:
                if flat.grad is not None:
                    self._sharded_muon_step(group, flat, self.partitions[id(flat)][1])
            return
        live = [(p, rows) for p, rows in zip(group["params"], group["matrix_rows"]) if p.grad is not None]
        if not live:
            return
        params = [p for p, _ in live]
        if any(p.ndim < 2 or p.shape[-2] % rows for p, rows in live):
            raise RuntimeError("MuonClip got flat DeepSpeed ZeRO partitions it has no layout for: Newton-Schulz needs "
                               "whole matrices; call MuonClip.attach_zero(engine.optimizer) after deepspeed.initialize")
        grads = [p.grad for p in params]
        bufs = [self._state_tensor(p, "momentum_buffer") for p in params]
        mu, lr = group["momentum"], group["lr"]
        # (1 - mu) x the formulas' M_t and G + mu M_t, one pass each; NS is blind to the scale.
        torch._foreach_lerp_(bufs, grads, 1 - mu)
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        matrices = [u.view(-1, rows, u.shape[-1]) for u, (_, rows) in zip(updates, live)]
        orthogonal = orthogonalize_all(matrices, group["ns_steps"], self.ns_dtype, self._split_group())
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        for (p, rows), o in zip(live, orthogonal):
            p.view(-1, rows, p.shape[-1]).add_(o, alpha=-lr * rms_match_scale(rows, p.shape[-1]))

    def _sharded_muon_step(self, group: dict, flat: torch.Tensor, layout: ShardLayout) -> None:
        """The same update on a ZeRO partition: momentum on this rank's elements, NS on whole matrices
        gathered a bucket of `ShardLayout.buckets` units at a time."""
        mu, lr = group["momentum"], group["lr"]
        buf = self._state_tensor(flat, "momentum_buffer")
        buf.lerp_(flat.grad, 1 - mu)
        update = flat.grad.lerp(buf, mu) if group["nesterov"] else buf
        step = torch.zeros_like(flat)  # this rank's elements of the RMS-matched orthogonal update
        for units in layout.buckets(self.bucket_numel):
            whole = layout.gather(update, units)  # each unit's matrices [count, R, C]
            rows = [self.matrix_rows[id(layout.params[unit.index])] for unit in units]
            matrices = [w.view(-1, r, w.shape[-1]) for w, r in zip(whole, rows)]
            orthogonal = orthogonalize_all(matrices, group["ns_steps"], self.ns_dtype, layout.group)
            del whole, matrices
            scaled = [o.to(flat.dtype).mul_(rms_match_scale(r, o.shape[-1])) for o, r in zip(orthogonal, rows)]
            layout.local(scaled, units, step)
        flat.mul_(1 - lr * group["weight_decay"]).add_(step, alpha=-lr)

    @torch.no_grad()
    def scale_weight(self, param: torch.Tensor, scale: torch.Tensor) -> None:
        """param *= scale (broadcast to param's full shape) in fp32, in every copy a step reads: the
        parameter (whole, or its ZeRO-3 shard) and, under ZeRO, its elements in the master partition."""
        master = self.master_of.get(id(param))
        shape = param.ds_shape if hasattr(param, "ds_tensor") else param.shape
        flat_scale = scale.to(torch.float32).expand(shape).reshape(-1)
        copies: dict[int, tuple[torch.Tensor, int]] = {}  # data_ptr -> (view, first element); dedup shared memory
        if master is None:
            copies[param.data_ptr()] = (param.data.view(-1), 0)
        else:
            flat, layout = master
            for pc in layout.local_pieces(param):
                view = flat.data[pc.offset:pc.offset + pc.end - pc.start]
                copies[view.data_ptr()] = (view, pc.start)
                if hasattr(param, "ds_tensor"):  # the model's own shard: the same elements
                    shard = param.ds_tensor.data.view(-1)[:pc.end - pc.start]
                    copies.setdefault(shard.data_ptr(), (shard, pc.start))
            if not hasattr(param, "ds_tensor"):  # ZeRO 1/2: every rank holds the whole parameter
                copies.setdefault(param.data_ptr(), (param.data.view(-1), 0))
        for view, start in copies.values():
            view.copy_(view.float() * flat_scale[start:start + view.numel()].to(view.device))

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        fused = all(p.is_cuda for p in params)
        exp_avgs = [self._state_tensor(p, "exp_avg") for p in params]
        exp_avg_sqs = [self._state_tensor(p, "exp_avg_sq") for p in params]
        steps = [self._step_count(p, fused) for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, foreach=not fused, fused=fused,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)

    def _state_tensor(self, p: torch.Tensor, key: str) -> torch.Tensor:
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state[key]

    def _step_count(self, p: torch.Tensor, fused: bool) -> torch.Tensor:
        """AdamW's step counter: on the parameter's device for the fused kernel, on the CPU otherwise."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
        return state["step"]

    def _split_group(self) -> dist.ProcessGroup | None:
        """The ranks that share the NS work: the given group, else the default world once it exists."""
        if self.dp_group is not None:
            return self.dp_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None


def rms_match_scale(rows: int, cols: int) -> float:
    """0.2 * sqrt(max(n, m)): gives the orthogonalized update AdamW's typical RMS (Moonlight)."""
    return 0.2 * math.sqrt(max(rows, cols))
