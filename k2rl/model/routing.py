"""Routing replay: the trainer's MoE layers send each token to the experts vLLM chose for it.

Why: vLLM (bf16 kernels) and the trainer compute router scores with different rounding, and with 64+
experts the 8th and 9th best scores of some tokens are closer than that rounding. Such a token then
goes to another expert in each engine, and its logprob differs by far more than bf16 noise (measured
on random k2-mini on one H200: one token in 32 per MoE layer, a 0.10 mean logprob gap). vLLM can
return the experts it used (`enable_return_routed_experts`); replaying them makes the two engines
compute the same function up to kernel rounding, as verl, slime and NeMo-RL do ("R3").

Only the choice of experts is replayed. Their weights come from the trainer's own router scores at
the replayed indices, so the router still gets gradients.

`routed` is [batch, seq, moe_layers, top_k] expert ids; a token whose row holds any -1 (no routing
from vLLM: padding, the last sampled token, PTX data) keeps the trainer's own choice.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def moe_layer_ids(config) -> list[int]:
    """Decoder layer indices that hold routed experts (DeepSeek-V3 layout: the first
    `first_k_dense_replace` layers are dense, then every `moe_layer_freq`-th)."""
    freq = getattr(config, "moe_layer_freq", 1) or 1
    return [i for i in range(config.num_hidden_layers) if i >= config.first_k_dense_replace and i % freq == 0]


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE layers' routers (DeepseekV3TopkRouter), in layer order."""
    decoder = model.model if hasattr(model, "model") else model
    return [layer.mlp.gate for layer in decoder.layers if hasattr(layer.mlp, "gate")]


def own_routing(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq, moe_layers, top_k]: the experts `model` picks itself for `input_ids` (no grad)."""
    picks = []
    hooks = [r.register_forward_hook(lambda m, _, out: picks.append(out[2].reshape(*input_ids.shape, -1)))
             for r in routers(model)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(picks, dim=2)


def _replayed_output(router: torch.nn.Module, output, replay: torch.Tensor):
    """The router's (logits, weights, indices) with indices replaced where `replay` has a full row;
    weights recomputed as transformers' DeepseekV3TopkRouter does, from the same scores."""
    logits, _, own = output
    replay = replay.reshape(-1, replay.shape[-1]).to(own.device, own.dtype)
    indices = torch.where((replay >= 0).all(-1, keepdim=True), replay, own)
    weights = logits.sigmoid().gather(1, indices)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, weights * router.routed_scaling_factor, indices


class Replay:
    """The routing a block of `replay_routing` hands to the routers. `routed` covers the whole batch;
    `use` narrows it to the part of the batch that the next forward pass takes (a forward over a
    shared prefix, then one over each sequence's rest: k2rl.model.shared_prefix)."""

    def __init__(self, routed: torch.Tensor):
        self.routed = self.part = routed

    def use(self, rows: slice, positions: slice) -> None:
        self.part = self.routed[rows, positions]


@contextmanager
def replay_routing(model: torch.nn.Module, routed: torch.Tensor | None):
    """Within the block, forward passes of `model` on inputs shaped like `routed[..., 0, 0]` use
    `routed`'s experts (see module doc); yields the `Replay` (None, and a no-op, when `routed` is None)."""
    if routed is None:
        yield None
        return
    moe_routers = routers(model)
    if routed.shape[2] != len(moe_routers):
        raise ValueError(f"routed experts cover {routed.shape[2]} MoE layers, the model has {len(moe_routers)}")
    replay = Replay(routed)
    handles = [router.register_forward_hook(lambda m, _, out, i=i: _replayed_output(m, out, replay.part[:, :, i]))
               for i, router in enumerate(moe_routers)]
    try:
        yield replay
    finally:
        for handle in handles:
            handle.remove()
