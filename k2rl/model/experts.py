"""How the trainer's MoE experts multiply: transformers' per-expert loop, or grouped GEMMs.

The grouped path runs one grouped GEMM per projection over all experts (torch's grouped_mm), our own
forward rather than transformers' `grouped_mm` experts, for three reasons measured on the GPU:
- torch's grouped_mm is not autocast-enabled. With fp32 master weights under bf16 autocast (MuonClip
  on a GPU) the expert stacks and the tokens must be cast to autocast's dtype by hand, as autocast
  does for every nn.Linear; we cast the tokens before gathering them (top_k rows per token), not after.
- transformers 5.17 (the GPU image's) masks expert-parallel sentinel rows on every call, EP or not:
  three passes over [tokens x top_k, hidden] tensors per MoE layer, 12% of a k2-mini step on an H100
  (`scripts/profile_train_step.py`, 2026-12-06). The trainer never splits experts, so there are none.
- a row gather by an index autograd cannot know is a permutation has a scatter-with-accumulate
  backward (index sort + `indexing_backward_kernel`, ~4% of the step in the same profile); the
  rows here are gathered through a permutation whose inverse we hold, so both backwards are gathers.
The parameters are transformers' fused [E, 2I, H] / [E, H, I] stacks either way, so MuonClip's
per-expert matrices and the per-expert checkpoint export do not depend on the choice; gradients
reach the fp32 stacks through the casts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ExpertsInterface

GROUPED_MM_AUTOCAST = "k2rl_grouped_mm_autocast"


def _grouped_mm(rows: torch.Tensor, weights_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch's public grouped GEMM where this torch has it, else the private op it wraps."""
    return getattr(F, "grouped_mm", torch._grouped_mm)(rows, weights_t, offs=offsets)


class _TokensToRows(torch.autograd.Function):
    """rows[m] = tokens[order[m] // top_k]: each token once per expert it goes to, grouped by expert.
    Backward: a token's gradient is the sum of its top_k rows' (read in token order through `inverse`)."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return tokens[order // top_k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse].view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


class _RowsToTokens(torch.autograd.Function):
    """rows[inverse]: the expert-grouped rows back in token order ([tokens x top_k, ...]). Backward: the
    gradient gathered through `order` (the inverse permutation)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return rows[inverse]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad[order], None, None


def grouped_mm_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """[tokens, hidden] -> [tokens, hidden]: each token through its top_k experts, weighted and summed
    (in fp32, as transformers sums them), computed in autocast's dtype when autocast is on."""
    device = hidden_states.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_states.dtype
    num_tokens, top_k = top_k_index.shape
    expert_of_row, order = torch.sort(top_k_index.reshape(-1))  # rows grouped by expert
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    rows = _TokensToRows.apply(hidden_states.to(dtype), order, inverse, top_k)
    # histc, not bincount: no host sync (CUDA graphs); it takes floats on the CPU and ints on CUDA
    counts = torch.histc(expert_of_row.float() if device == "cpu" else expert_of_row.int(),
                         bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up = _grouped_mm(rows, self.gate_up_proj.to(dtype).transpose(-2, -1), offsets)
    out = _grouped_mm(self._apply_gate(up), self.down_proj.to(dtype).transpose(-2, -1), offsets)
    # In token order before weighting: the gather moves the GEMM's bf16 rows, not fp32 products
    weighted = _RowsToTokens.apply(out, order, inverse).view(num_tokens, top_k, -1) * top_k_weights[..., None]
    return weighted.sum(dim=1).to(hidden_states.dtype)


ExpertsInterface.register(GROUPED_MM_AUTOCAST, grouped_mm_forward)


def set_experts_implementation(model: torch.nn.Module, choice: str, device: torch.device) -> str:
    """Apply `train.experts_implementation` ("auto": grouped_mm on CUDA; eager on the CPU, where
    grouped_mm measured no faster at k2-tiny's shapes); returns what it chose."""
    if choice not in ("auto", "eager", "grouped_mm"):
        raise ValueError(f"train.experts_implementation {choice!r}: use auto, eager or grouped_mm")
    chosen = ("grouped_mm" if device.type == "cuda" else "eager") if choice == "auto" else choice
    # Set after construction: a registered name is accepted at dispatch, while the construction-time
    # check of some transformers releases knows only its own names.
    model.config._experts_implementation = GROUPED_MM_AUTOCAST if chosen == "grouped_mm" else "eager"
    return chosen
