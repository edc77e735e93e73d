"""How the trainer's MoE experts multiply: transformers' per-expert loop, or grouped GEMMs.

transformers' `grouped_mm` experts run one grouped GEMM per projection over all experts. torch's
grouped_mm is not autocast-enabled, though: with fp32 master weights under bf16 autocast (MuonClip on
a GPU) it would multiply in fp32, off the bf16 fast path. Our variant first casts the expert stacks to
autocast's dtype, as autocast does for every nn.Linear; gradients still reach the fp32 parameters.
The parameters are the same fused [E, 2I, H] / [E, H, I] tensors either way, so MuonClip's per-expert
matrices and the per-expert checkpoint export do not depend on the choice.
"""
from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward

GROUPED_MM_AUTOCAST = "k2rl_grouped_mm_autocast"


class _CastExperts:
    """An experts module seen with its weight stacks in another dtype (differentiable casts)."""

    def __init__(self, experts: torch.nn.Module, dtype: torch.dtype):
        self._experts = experts
        self.gate_up_proj = experts.gate_up_proj.to(dtype)
        self.down_proj = experts.down_proj.to(dtype)

    def __getattr__(self, name):
        return getattr(self._experts, name)


def grouped_mm_autocast_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm experts, computed in autocast's dtype when autocast is on."""
    device = hidden_states.device.type
    if torch.is_autocast_enabled(device) and self.gate_up_proj.dtype != torch.get_autocast_dtype(device):
        self = _CastExperts(self, torch.get_autocast_dtype(device))
    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(GROUPED_MM_AUTOCAST, grouped_mm_autocast_forward)


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
