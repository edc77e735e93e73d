"""Routed experts copied straight into vLLM's fused expert tensors, past vLLM's per-tensor loaders.

Why: vLLM's in-place reload sends every checkpoint tensor through its layerwise-reload wrapper and the
model's name matching, a fraction of a millisecond of Python per tensor (measured on the CPU: ~0.5 ms
per loader call). Routed experts are most of those tensors: 3 per expert per MoE layer, 2,112 per sync
for k2-mini, ~69,000 for K2. On a GPU vLLM's unquantized fused-MoE kernel reads `w13_weight`
[experts, 2 x inter, hidden] (gate rows, then up rows) and `w2_weight` [experts, hidden, inter] in the
checkpoint's own layout, so each expert is three slice copies of this tensor-parallel rank's share
(sent whole, or already narrowed to that share by the trainer).

Runs inside vLLM's worker (collective_rpc). Layers whose layout vLLM transforms keep vLLM's loader:
on the CPU (experts are pre-packed for the CPU kernel), quantized experts, expert parallelism.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from k2rl.engines.types import ExpertShard

EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def direct_targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Checkpoint prefix (`model.layers.N.mlp.experts`) -> vLLM's expert module, for every MoE layer,
    or {} when any layer's layout is not the checkpoint's (see module doc)."""
    if not torch.cuda.is_available():
        return {}
    targets = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "w13_weight") and hasattr(module, "w2_weight")):
            continue
        if getattr(module, "quant_config", None) is not None or getattr(module, "use_ep", False):
            return {}
        targets[name.removesuffix(".routed_experts")] = module
    return targets


def copy_experts(targets: dict[str, torch.nn.Module], named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy each (checkpoint name, expert matrix) into its module's slice for this rank; returns the
    number of tensors copied. A matrix is either whole or already this rank's slice (the trainer's
    `ExpertShard` export). A name or shape that does not fit is an error, not a silent skip."""
    count = 0
    for name, weight in named_tensors:
        match = EXPERT.match(name)
        if match is None or match.group(1) not in targets:
            raise ValueError(f"{name}: not a routed expert of this vLLM model")
        module, expert, proj = targets[match.group(1)], int(match.group(2)), match.group(3)
        part = _rank_slice(name, weight, module)
        if proj == "down_proj":
            module.w2_weight[expert].copy_(part)
        else:
            inter = part.shape[0]
            half = 0 if proj == "gate_proj" else inter
            module.w13_weight[expert, half:half + inter].copy_(part)
        count += 1
    return count


def _rank_slice(name: str, weight: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """`weight` as this rank holds it: as sent when it is already the rank's slice, else narrowed."""
    parallel = module.moe_config.moe_parallel_config
    inter = module.w2_weight.shape[2]
    size = weight.shape[ExpertShard.inter_dim(name)]
    if size == inter:
        return weight
    if size != inter * parallel.tp_size:
        raise ValueError(f"{name}: inter size {size}, vLLM holds {inter} per rank of {inter * parallel.tp_size} "
                         "(padded experts take vLLM's loader)")
    return ExpertShard(parallel.tp_rank, parallel.tp_size).narrow(name, weight)


@contextmanager
def experts_left_out_of_reload():
    """vLLM's reload of everything but the experts: its layerwise reloader warns "Failed to load weights"
    for each expert module the stream left out (and keeps their tensors, which `copy_experts` fills
    next); silence that one message, nothing else."""
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    expected = _DropMessage("Failed to load weights", "RoutedExperts")
    log.addFilter(expected)
    try:
        yield
    finally:
        log.removeFilter(expected)


class _DropMessage(logging.Filter):
    def __init__(self, text: str, layer: str):
        super().__init__()
        self.text, self.layer = text, layer

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.text in str(record.msg) and record.args and record.args[0] == self.layer)
