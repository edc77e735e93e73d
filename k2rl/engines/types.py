"""The data both engines exchange with the rest of k2rl: sampling settings, generations, token batches.

Why a module of its own: the agent loop, rewards and the training loop build and read these, but
must not import vLLM or DeepSpeed (the driver holds no model; only the worker touches the engines).
This module imports neither, directly or through another k2rl module.

`TokenBatch` layout: whole sequences (prompt + completion) as token ids, and beside them per-token
tensors of the same length (`loss_mask`, and any `token_data` such as old logprobs or advantages)
and per-sequence values (`seq_data`, e.g. rewards). Entry t of anything per token belongs to token t.
`token_data[ROUTED_EXPERTS]`, when present, is [T_i, moe_layers, top_k] expert ids (-1: not routed by
vLLM) that the trainer replays (k2rl.model.routing).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROUTED_EXPERTS = "routed_experts"


def is_routed_expert(name: str) -> bool:
    """A routed expert's weight, in the trainer's names (fused per layer) or in checkpoint names."""
    return ".mlp.experts." in name


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | list[int] = 256  # a list gives one budget per prompt
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    seed: int | list[int] | None = None  # per prompt: a list, or an int s giving prompt i the seed s + i
    json_schema: dict | None = None  # constrain the output to this JSON Schema (vLLM structured outputs)

    def per_prompt(self, count: int) -> list[tuple[int, int | None]]:
        """(max_tokens, seed) for each of `count` prompts; list-valued fields must have one entry per prompt."""
        budgets = self.max_tokens if isinstance(self.max_tokens, list) else [self.max_tokens] * count
        seeds = (self.seed if isinstance(self.seed, list) else [None] * count if self.seed is None
                 else [self.seed + i for i in range(count)])  # repeats of a prompt still sample anew
        if len(budgets) != count or len(seeds) != count:
            raise ValueError(f"{len(budgets)} max_tokens and {len(seeds)} seeds for {count} prompts")
        return list(zip(budgets, seeds))


@dataclass
class Generation:
    token_ids: list[int]  # generated ids; with finish_reason "stop" the stop token is the last id
    logprobs: list[float]  # one per token id: the sampled token's logprob under vLLM's policy
    finish_reason: str  # "stop" | "length"
    # With routing replay: [positions, moe_layers, top_k] int16, the experts vLLM used at each position of
    # prompt + token_ids (the last sampled token was never run through the model, so it has no row).
    routed_experts: torch.Tensor | None = None


@dataclass
class TokenBatch:
    input_ids: list[torch.Tensor]  # per sequence, int64 [T_i]
    loss_mask: list[torch.Tensor]  # per sequence, bool [T_i]; False at position 0
    token_data: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per sequence, [T_i]
    seq_data: dict[str, torch.Tensor] = field(default_factory=dict)  # [num_sequences]

    @classmethod
    def from_lists(cls, input_ids: list[list[int]], loss_mask: list[list[bool]] | None = None, **token_data) -> TokenBatch:
        """Build from plain lists; `loss_mask` defaults to every token after the first."""
        ids = [torch.tensor(s, dtype=torch.long) for s in input_ids]
        mask = ([torch.tensor(m, dtype=torch.bool) for m in loss_mask] if loss_mask is not None
                else [torch.arange(len(s)) > 0 for s in ids])
        extra = {k: [torch.as_tensor(v, dtype=torch.float32) for v in vals] for k, vals in token_data.items()}
        return cls(ids, mask, extra)

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, indices: list[int]) -> TokenBatch:
        return TokenBatch([self.input_ids[i] for i in indices], [self.loss_mask[i] for i in indices],
                          {k: [v[i] for i in indices] for k, v in self.token_data.items()},
                          {k: v[indices] for k, v in self.seq_data.items()})

    def shard(self, index: int, count: int) -> TokenBatch:
        """Sequences index, index+count, ... : an even split across data-parallel ranks."""
        return self.select(list(range(index, len(self), count)))

    def to(self, device) -> TokenBatch:
        return TokenBatch([t.to(device) for t in self.input_ids], [t.to(device) for t in self.loss_mask],
                          {k: [t.to(device) for t in v] for k, v in self.token_data.items()},
                          {k: v.to(device) for k, v in self.seq_data.items()})

    def num_loss_tokens(self) -> int:
        return int(sum(m.sum() for m in self.loss_mask))

    def micro_batches(self, max_tokens: int, shared: int = 0) -> list[TokenBatch]:
        """Greedy split in order, each at most `max_tokens` once padded (a longer sequence goes alone).
        With a prefix of `shared` tokens that every sequence opens with and the trainer runs once
        (k2rl.model.shared_prefix), a group costs those tokens once plus each sequence's padded rest."""
        groups, current, longest = [], [], 0
        cost = lambda longest, count: shared + (longest - shared) * count  # noqa: E731
        for i, seq in enumerate(self.input_ids):
            longest_if_added = max(longest, len(seq))
            if current and cost(longest_if_added, len(current) + 1) > max_tokens:
                groups.append(current)
                current, longest_if_added = [], len(seq)
            current.append(i)
            longest = longest_if_added
        if current:
            groups.append(current)
        return [self.select(g) for g in groups]


def concat_batches(batches: list[TokenBatch]) -> TokenBatch:
    first = batches[0]
    return TokenBatch([s for b in batches for s in b.input_ids], [m for b in batches for m in b.loss_mask],
                      {k: [t for b in batches for t in b.token_data[k]] for k in first.token_data},
                      {k: torch.cat([b.seq_data[k] for b in batches]) for k in first.seq_data})


def completion_batch(prompts: list[list[int]], generations: list[list[Generation]]) -> TokenBatch:
    """Prompt + each prompt's first generation as sequences, the loss on the generated tokens and
    vLLM's logprobs beside them (`rollout_logprobs`): what the vLLM-trainer gap is measured on."""
    ids, mask, logprobs = [], [], []
    for prompt, (g, *_) in zip(prompts, generations):
        ids.append(list(prompt) + g.token_ids)
        mask.append([False] * len(prompt) + [True] * len(g.token_ids))
        logprobs.append([0.0] * len(prompt) + g.logprobs)
    batch = TokenBatch.from_lists(ids, mask, rollout_logprobs=logprobs)
    add_routing(batch, [g.routed_experts for g, *_ in generations])
    return batch


def add_routing(batch: TokenBatch, routings: list[torch.Tensor | None]) -> None:
    """Put vLLM's routing per sequence into `batch.token_data[ROUTED_EXPERTS]`, one row per token: rows
    vLLM did not route (the last token, a sequence without routing) are -1, i.e. the trainer routes
    them itself. Nothing is added when no sequence has routing."""
    known = [r for r in routings if r is not None]
    if not known:
        return
    rows = []
    for seq, routed in zip(batch.input_ids, routings):
        full = torch.full((len(seq), *known[0].shape[1:]), -1, dtype=torch.int16)
        if routed is not None:
            n = min(len(seq), len(routed))
            full[:n] = routed[:n]
        rows.append(full)
    batch.token_data[ROUTED_EXPERTS] = rows
