"""The trainer-side K2 model: transformers' DeepseekV3 plus what RL training needs from it.

We keep transformers' implementation (MLA, sigmoid noaux_tc router, shared expert) and add:
- an attention function that records each head's max pre-softmax logit, for QK-Clip (attention.py);
- weight export and import under the checkpoint names vLLM loads (one tensor per expert), since
  transformers holds experts fused as [E, 2I, H] / [E, H, I].
How the experts multiply (per-expert loop or grouped GEMMs) is chosen in experts.py.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from k2rl.model.attention import MAX_LOGIT_ATTENTION, MAX_LOGIT_ATTR
from k2rl.model.shared_prefix import token_logprobs


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in _decoder(model).layers]


def head_max_logits(model: torch.nn.Module) -> torch.Tensor | None:
    """[layers, heads] max pre-softmax logits seen since the last reset (None before any
    training-mode forward: eval passes do not record)."""
    per_layer = [getattr(m, MAX_LOGIT_ATTR, None) for m in attention_modules(model)]
    if any(t is None for t in per_layer):
        return None
    return torch.stack(per_layer)


def reset_max_logits(model: torch.nn.Module) -> None:
    for module in attention_modules(model):
        setattr(module, MAX_LOGIT_ATTR, None)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    return model.model if hasattr(model, "model") else model


def build_model(config: DeepseekV3Config, dtype: torch.dtype = torch.float32, seed: int | None = None) -> DeepseekV3ForCausalLM:
    """A randomly initialised model with max-logit recording on; `seed` makes it reproducible."""
    config._attn_implementation = MAX_LOGIT_ATTENTION
    if seed is not None:
        torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).to(dtype)
    return model


_FUSED_GATE_UP = re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$")
_FUSED_DOWN = re.compile(r"^(.*\.mlp\.experts)\.down_proj$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def to_checkpoint_names(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Map transformers' names to checkpoint names: fused experts split into one tensor per expert."""
    for name, tensor in named:
        if m := _FUSED_GATE_UP.match(name):
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{m.group(1)}.{e}.gate_proj.weight", tensor[e, :inter]
                yield f"{m.group(1)}.{e}.up_proj.weight", tensor[e, inter:]
        elif m := _FUSED_DOWN.match(name):
            for e in range(tensor.shape[0]):
                yield f"{m.group(1)}.{e}.down_proj.weight", tensor[e]
        else:
            yield name, tensor


def from_checkpoint_names(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of `to_checkpoint_names`: stack per-expert tensors back into transformers' fused layout."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in named:
        if m := _PER_EXPERT.match(name):
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = tensor
        else:
            state[name] = tensor
    for prefix, parts in experts.items():
        count = len(parts["down_proj"])
        stack = lambda kind: torch.stack([parts[kind][e] for e in range(count)])  # noqa: E731
        state[f"{prefix}.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
        state[f"{prefix}.down_proj"] = stack("down_proj")
    return state


def trainable_state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters plus the persistent buffers a checkpoint carries (the router's correction bias)."""
    yield from model.named_parameters()
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            yield name, buf


def export_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's full weights under vLLM's checkpoint names (views, no copies)."""
    return to_checkpoint_names((n, t.detach()) for n, t in trainable_state(model))


@torch.no_grad()
def completion_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Per-token logprobs of `completion` after `prompt` under `model` (fp32 log-softmax)."""
    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    return token_logprobs(model(ids).logits[0, len(prompt) - 1:-1], ids[0, len(prompt):]).cpu()


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """`steps` argmax tokens after `prompt`, by full re-forward (a reference, not a fast path)."""
    ids = list(prompt)
    device = next(model.parameters()).device
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    return ids[len(prompt):]
