"""Size a K2-family model before launching: total and active parameters, and training memory per GPU.

Counts come from building the model on the meta device (no memory), so they match what the trainer
builds exactly. Memory follows ZeRO's partitioning of bf16 weights, bf16 grads and fp32 optimizer
state (master copy plus Muon's momentum or AdamW's two moments).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DeepseekV3Config

from k2rl.model.modeling import build_model
from k2rl.model.presets import preset_config

GIB = 1 << 30


@dataclass
class Plan:
    total: int
    active: int
    experts: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float

    @property
    def per_gpu_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib


def count_parameters(config: DeepseekV3Config) -> tuple[int, int, int]:
    """(total, active per token, routed-expert) parameter counts."""
    with torch.device("meta"):
        model = build_model(config)
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".mlp.experts." in name:
            experts += p.numel()
    active = total - experts + experts * config.num_experts_per_tok // config.n_routed_experts
    return total, active, experts


def plan(preset: str, gpus: int, zero_stage: int, optimizer: str = "muonclip") -> Plan:
    total, active, experts = count_parameters(DeepseekV3Config(**preset_config(preset)))
    state_words = 2 if optimizer == "muonclip" else 3  # fp32 master + momentum | master + two moments
    weights = total * 2 / (gpus if zero_stage >= 3 else 1)
    grads = total * 2 / (gpus if zero_stage >= 2 else 1)
    optim = total * 4 * state_words / (gpus if zero_stage >= 1 else 1)
    return Plan(total, active, experts, weights / GIB, grads / GIB, optim / GIB)
