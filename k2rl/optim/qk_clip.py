"""QK-Clip for MLA (K2 report): after the optimizer step, shrink the query/key weights of every head
whose max pre-softmax logit exceeded tau, so that the same inputs would now give at most tau.

For head h with S = max logit > tau, gamma = tau / S: q_nope and k_nope rows (q_b_proj, kv_b_proj) are
scaled by sqrt(gamma) and q_rope rows by gamma, so both logit terms shrink by exactly gamma. The rope
key is shared by all heads (last rows of kv_a_proj_with_mqa) and is left alone, as are values and the
down projections (an RMSNorm follows them, which would undo any scaling).

Under DeepSpeed ZeRO 1/2/3 the weights that the next step reads are MuonClip's master partitions
(and, under ZeRO 3, each rank's shard of the weight): pass the optimizer, whose `scale_weight` scales
exactly the elements this rank holds in each copy.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from k2rl.model.modeling import attention_modules, head_max_logits, reset_max_logits


Scaler = Callable[[torch.Tensor, torch.Tensor], None]  # (parameter, scale broadcast to its shape)


def apply_qk_clip(model: torch.nn.Module, tau: float, group: dist.ProcessGroup | None = None,
                  optimizer=None) -> dict[str, float]:
    """Clip the heads over `tau` from the maxima recorded since the last call (max-reduced over `group`,
    or the default group when torch.distributed is initialized), then reset the recorded maxima.
    `optimizer`: the MuonClip stepping the model (needed under ZeRO 1/2/3; see the module doc)."""
    modules = attention_modules(model)
    logits = head_max_logits(model)
    if logits is None:  # no forward since the last reset on this rank: it contributes nothing
        heads = modules[0].num_heads
        logits = torch.full((len(modules), heads), float("-inf"), device=modules[0].q_b_proj.weight.device)
    logits = logits.float()
    if group is not None or (dist.is_available() and dist.is_initialized()):
        dist.all_reduce(logits, op=dist.ReduceOp.MAX, group=group)
    reset_max_logits(model)
    logits = logits.cpu()
    over = logits > tau
    scale = optimizer.scale_weight if optimizer is not None else _scale_in_place
    with torch.no_grad():
        for module, head_max, clip in zip(modules, logits, over):
            if clip.any():
                gamma = torch.where(clip, tau / head_max, torch.ones_like(head_max))
                _scale_heads(module, gamma, scale)
    return {"attn/max_logit": float(logits.max()), "attn/clipped_heads": int(over.sum())}


def _scale_heads(attn: torch.nn.Module, gamma: torch.Tensor, scale: Scaler) -> None:
    """Scale q_b_proj rows by [sqrt(g)]*nope + [g]*rope and kv_b_proj rows by [sqrt(g)]*nope + [1]*v, per head.
    Heads with gamma 1 are multiplied by exactly 1.0, which leaves their bits unchanged."""
    root = gamma.sqrt()[:, None]
    nope, rope, v = attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    q_scale = torch.cat([root.expand(-1, nope), gamma[:, None].expand(-1, rope)], dim=1)
    k_scale = torch.cat([root.expand(-1, nope), torch.ones(len(gamma), v)], dim=1)
    _scale_rows(attn.q_b_proj, q_scale.flatten(), scale)
    _scale_rows(attn.kv_b_proj, k_scale.flatten(), scale)


def _scale_rows(linear: torch.nn.Linear, rows: torch.Tensor, scale: Scaler) -> None:
    """Multiply output rows (and bias entries)."""
    for tensor, s in ((linear.weight, rows[:, None]), (linear.bias, rows)):
        if tensor is not None:
            scale(tensor, s)


def _scale_in_place(tensor: torch.Tensor, s: torch.Tensor) -> None:
    """In fp32, so bf16 weights get gamma at full precision."""
    tensor.copy_(tensor.float() * s.to(tensor.device))
