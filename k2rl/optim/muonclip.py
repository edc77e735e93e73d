"""MuonClip's optimizer half: Muon (Nesterov momentum, NS5, RMS matched to AdamW, decoupled weight
decay) for weight matrices and AdamW for the rest, one lr and wd for both (K2 report, Algorithm 1).
QK-Clip, the other half, runs after `step()` (`k2rl.optim.qk_clip`).

DeepSpeed: use ZeRO stage 0 with fp32 parameters (compute in bf16 through autocast if wanted).
- Newton-Schulz needs whole matrices. ZeRO-1/2 hand a client optimizer flat partitions of one
  flattened buffer, so matrix boundaries are gone; ZeRO-3 also partitions the parameters themselves.
  DeepSpeed's own Muon works around that inside ZeRO's gradient path, but scales updates by
  sqrt(max(1, rows/cols)) instead of K2's 0.2*sqrt(max(n, m)) and sees a fused [E, 2I, H] gate_up
  as E matrices of 2I rows where K2 orthogonalizes gate and up apart, so it is not K2's update.
- Under stage 0 DeepSpeed all-reduces gradients and calls `step()` with the real parameters on every
  rank. Each rank updates the momentum (elementwise, cheap), orthogonalizes only its share of the
  matrices and all-gathers the results (`k2rl.optim.batched`), so the NS work is split across ranks
  and every rank applies identical bits.
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
        live = [(p, rows) for p, rows in zip(group["params"], group["matrix_rows"]) if p.grad is not None]
        if not live:
            return
        params = [p for p, _ in live]
        if any(p.ndim < 2 or p.shape[-2] % rows for p, rows in live):
            raise RuntimeError("MuonClip got flattened parameters (DeepSpeed ZeRO-1/2/3 partitions): Newton-Schulz "
                               "needs whole matrices, so run it under ZeRO stage 0 with fp32 parameters")
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
