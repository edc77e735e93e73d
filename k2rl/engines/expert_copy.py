"""Routed experts copied straight from the trainer's fused stacks into vLLM's fused expert tensors,
past vLLM's per-tensor loaders and without an export buffer.

Why: vLLM's in-place reload sends every checkpoint tensor through its layerwise-reload wrapper and the
model's name matching, a fraction of a millisecond of Python per tensor (measured on the CPU: ~0.5 ms
per loader call), and routed experts are most of those tensors (3 per expert per MoE layer: 2,112 per
sync for k2-mini, ~69,000 for K2). But the trainer already holds each MoE layer's experts as two fused
stacks, `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I], and vLLM's
unquantized fused-MoE kernel reads `w13_weight` [E, 2 x I/T, H] and `w2_weight` [E, H, I/T] in the same
layout, cut to tensor-parallel rank r's block of I. So a layer is three strided copies of the rank's
share, each casting on the way (fp32 master -> bf16): no per-expert Python, no intermediate bytes.
The engine runs in the worker's own process (vLLM's in-process executors), so the stacks are the
trainer's live tensors.

Runs inside vLLM's worker (collective_rpc). Layers whose layout vLLM transforms keep vLLM's loader:
on the CPU (experts are pre-packed for the CPU kernel), quantized experts, expert parallelism.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from types import SimpleNamespace

import torch

STACK = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def expert_buffers(experts: int, hidden: int, inter: int, tp_rank: int = 0, tp_size: int = 1,
                   device: str | torch.device = "cpu") -> SimpleNamespace:
    """Empty bf16 tensors laid out as vLLM's unquantized fused-MoE module holds TP rank `tp_rank`'s
    share (`w13_weight`, `w2_weight`, `moe_config.moe_parallel_config`): a stand-in target for
    `copy_experts` where no vLLM engine runs (its tests, the CPU sync benchmark)."""
    block = inter // tp_size
    parallel = SimpleNamespace(tp_rank=tp_rank, tp_size=tp_size)
    return SimpleNamespace(w13_weight=torch.empty(experts, 2 * block, hidden, dtype=torch.bfloat16, device=device),
                           w2_weight=torch.empty(experts, hidden, block, dtype=torch.bfloat16, device=device),
                           moe_config=SimpleNamespace(moe_parallel_config=parallel))


def direct_targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Trainer prefix (`model.layers.N.mlp.experts`) -> vLLM's expert module, for every MoE layer, or
    {} when any layer's layout is not the trainer's (see module doc)."""
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


def copy_experts(targets: dict[str, torch.nn.Module], stacks: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy this rank's block of each (trainer name, whole fused stack) into its vLLM module, cast to
    vLLM's dtype; returns the bytes written. A name or shape that does not fit is an error, not a skip."""
    written = 0
    for name, stack in stacks:
        match = STACK.match(name)
        if match is None or match.group(1) not in targets:
            raise ValueError(f"{name}: not a routed-expert stack of this vLLM model")
        module = targets[match.group(1)]
        parallel = module.moe_config.moe_parallel_config
        inter = module.w2_weight.shape[2]  # this rank's block of the intermediate dimension
        block = slice(parallel.tp_rank * inter, (parallel.tp_rank + 1) * inter)
        if match.group(2) == "down_proj":
            pairs = [(module.w2_weight, _inter_block(name, stack, 2, block, inter * parallel.tp_size))]
        else:
            whole = inter * parallel.tp_size
            gate, up = stack[:, :whole], stack[:, whole:]
            pairs = [(module.w13_weight[:, :inter], _inter_block(name, gate, 1, block, whole)),
                     (module.w13_weight[:, inter:], _inter_block(name, up, 1, block, whole))]
        for target, source in pairs:
            if source.shape != target.shape:
                raise ValueError(f"{name}: this rank's block is {tuple(source.shape)}, vLLM holds {tuple(target.shape)}")
            target.copy_(source)
            written += target.numel() * target.element_size()
    return written


def _inter_block(name: str, stack: torch.Tensor, dim: int, block: slice, whole: int) -> torch.Tensor:
    """`stack`'s rows/columns `block` along the intermediate dimension `dim`, which must be `whole` long."""
    if stack.shape[dim] != whole:
        raise ValueError(f"{name}: intermediate size {stack.shape[dim]}, vLLM holds {whole} in all "
                         "(padded experts take vLLM's loader)")
    return stack.narrow(dim, block.start, block.stop - block.start)
