"""The trainer-side K2 model: transformers' DeepseekV3 plus what RL training needs from it.

We keep transformers' implementation (MLA, sigmoid noaux_tc router, shared expert) and add:
- an attention function that records each head's max pre-softmax logit, for QK-Clip;
- weight export and import under the checkpoint names vLLM loads (one tensor per expert), since
  transformers holds experts fused as [E, 2I, H] / [E, H, I].
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from transformers import AttentionInterface, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

MAX_LOGIT_ATTENTION = "k2rl_sdpa_max_logit"
MAX_LOGIT_ATTR = "k2rl_max_logit"


def _causal_scores_max(module, query, key, attention_mask, scaling) -> torch.Tensor:
    """Per-head max of q.k * scaling over the batch and the positions the mask lets attend."""
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    q_len, k_len = scores.shape[-2:]
    if attention_mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], float("-inf"))
    else:
        scores = scores + attention_mask[..., :k_len].float()
    return scores.amax(dim=(0, 2, 3))


def max_logit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA attention that also keeps a running per-head max logit on the attention module."""
    with torch.no_grad():
        head_max = _causal_scores_max(module, query, key, attention_mask, scaling)
        previous = getattr(module, MAX_LOGIT_ATTR, None)
        setattr(module, MAX_LOGIT_ATTR, head_max if previous is None else torch.maximum(previous, head_max))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(MAX_LOGIT_ATTENTION, max_logit_attention)
AttentionMaskInterface.register(MAX_LOGIT_ATTENTION, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in _decoder(model).layers]


def head_max_logits(model: torch.nn.Module) -> torch.Tensor | None:
    """[layers, heads] max pre-softmax logits seen since the last reset (None before any forward)."""
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
    logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0].cpu()


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """`steps` argmax tokens after `prompt`, by full re-forward (a reference, not a fast path)."""
    ids = list(prompt)
    device = next(model.parameters()).device
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax()))
    return ids[len(prompt):]
