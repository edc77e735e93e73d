"""Which parameters Muon takes, and the optimizer the config names."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from k2rl.optim.muonclip import MuonClip

if TYPE_CHECKING:
    from k2rl.config import OptimizerConfig

# Matrices that are lookup tables or read-outs rather than linear maps between hidden states stay
# on AdamW (Moonlight, K2), as do all vectors (norms, biases).
ADAMW_MATRICES = ("embed_tokens", "lm_head")
FUSED_GATE_UP = "gate_up_proj"


def matrix_rows(name: str, param: torch.Tensor) -> int:
    """Rows of one checkpoint matrix inside `param`: fused [E, 2I, H] gate_up holds gate and up of I rows."""
    return param.shape[-2] // 2 if name.endswith(FUSED_GATE_UP) else param.shape[-2]


def muonclip_param_groups(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> list[dict]:
    """A Muon group (matrices, with their `matrix_rows`) and an AdamW group (everything else)."""
    muon: list[torch.Tensor] = []
    rows: list[int] = []
    other: list[torch.Tensor] = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and not any(key in name for key in ADAMW_MATRICES):
            muon.append(param)
            rows.append(matrix_rows(name, param))
        else:
            other.append(param)
    return [dict(params=muon, use_muon=True, matrix_rows=rows), dict(params=other, use_muon=False)]


def newton_schulz_dtype(cfg: OptimizerConfig, device: torch.device) -> torch.dtype:
    """`cfg.ns_dtype`; auto: fp16 where the step runs on a GPU (tensor cores), fp32 on the CPU, whose fp16
    matmul is emulated (k2-tiny's demo step: Newton-Schulz 1.2 of 2.7 s in fp16)."""
    if cfg.ns_dtype != "auto":
        return getattr(torch, cfg.ns_dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, group: dist.ProcessGroup | None = None,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """MuonClip or AdamW by `cfg.name`; `group` is the data-parallel group MuonClip splits NS work over
    (default: the whole world once torch.distributed is initialized). `device`: where the steps will
    run, when the model is not there yet (a trainer builds the optimizer before DeepSpeed moves the
    model to the GPU); default: where its parameters are."""
    device = device or next(model.parameters()).device
    if cfg.name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 fused=fused, foreach=not fused)
    return MuonClip(muonclip_param_groups(model.named_parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay,
                    momentum=cfg.momentum, nesterov=cfg.nesterov, betas=cfg.betas, eps=cfg.eps,
                    ns_steps=cfg.ns_steps, ns_dtype=newton_schulz_dtype(cfg, device), group=group,
                    bucket_numel=cfg.zero_bucket_numel)
