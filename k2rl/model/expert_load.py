"""How evenly each MoE layer's router spreads the training tokens over its routed experts, and the
routers' auxiliary-loss-free balancing.

Why: a model trained from scratch (the demos' SFT cold starts) can send most tokens to a few experts
and leave the others untrained, which no loss curve shows. The trainer logs, per optimizer step,
`moe/max_load`: the busiest expert's share of its layer's assignments times the number of experts
(1 = even; the worst layer), and `moe/idle_experts`: the (layer, expert) pairs that got no token.
Counted over every position of the step's forward passes (padding included; recomputed forwards
count twice, evenly), from the routers' own picks (before routing replay substitutes vLLM's).

With `optimizer.router_bias_update` (DeepSeek-V3's bias update speed) the same counts then balance
the routers as DeepSeek-V3 and K2 do, without an auxiliary loss: each router's selection bias
(`e_score_correction_bias`, which picks the experts but does not weight them) goes up by that much
for every expert below its layer's mean load and down for every one above it. At 0 a checkpoint's
bias stays as it came, as RL on a pretrained model wants.
"""
from __future__ import annotations

from functools import partial

import torch

from k2rl.model.routing import routers


class ExpertLoad:
    """Counts the experts each router picks in forwards that record gradients (training; not the
    logprob passes), from its registration until `take`."""

    def __init__(self, model: torch.nn.Module):
        self.routers = routers(model)
        self.counts: list[torch.Tensor | None] = [None] * len(self.routers)
        self.hooks = [r.register_forward_hook(partial(self._count, i)) for i, r in enumerate(self.routers)]

    def _count(self, layer: int, router: torch.nn.Module, _inputs, output) -> None:
        if not torch.is_grad_enabled():
            return
        picks = output[2].detach().flatten()
        if self.counts[layer] is None:
            self.counts[layer] = torch.zeros(router.num_experts, dtype=torch.long, device=picks.device)
        # not bincount: on CUDA it reads the largest id back to size its output, a sync per layer
        self.counts[layer].index_add_(0, picks, torch.ones_like(picks))

    def take(self, reduce=None, bias_update: float = 0.0) -> dict[str, float]:
        """The metrics since the last `take` (empty when nothing was counted), then start over.
        `reduce`: sums the [layers, experts] counts across ranks in place (all ranks must call it: every
        rank then moves its biases alike). `bias_update`: the balancing step (module doc)."""
        if not self.routers:
            return {}
        empty = torch.zeros(self.routers[0].num_experts, dtype=torch.long, device=self.routers[0].weight.device)
        counts = torch.stack([empty if t is None else t.to(empty.device) for t in self.counts]).float()
        self.counts = [None] * len(self.routers)
        if reduce is not None:
            reduce(counts)
        per_layer = counts.sum(dim=1)
        if not per_layer.all():
            return {}
        share = counts / per_layer[:, None]
        if bias_update:
            self._balance(counts, bias_update)
        return {"moe/max_load": float(share.max() * counts.shape[1]), "moe/idle_experts": int((counts == 0).sum())}

    @torch.no_grad()
    def _balance(self, counts: torch.Tensor, rate: float) -> None:
        nudges = rate * torch.sign(counts.mean(dim=1, keepdim=True) - counts)
        for router, nudge in zip(self.routers, nudges):
            bias = router.e_score_correction_bias
            bias += nudge.to(bias.device, bias.dtype)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
