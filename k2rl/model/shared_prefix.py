"""Per-token logprobs of a right-padded batch whose sequences open alike, the shared prefix run once.

Why: agentic prompts open with the same system prompt and tool schemas (the shop domain: 559 of a
dialog's ~680 tokens), and a task's K samples share its whole prompt. Run on every sequence, that
prefix is most of a train step's work. Here it is run once, batch of one, with its keys and values
kept; the cache is repeated for the batch and the sequences' rests attend to it. Autograd sums the
gradients of the repeated cache into the one prefix pass, so logprobs and gradients equal the plain
batched pass up to float rounding (tests/test_shared_prefix.py).

Not under gradient checkpointing (a recomputed layer would write the prefix's keys into the cache again)
nor ZeRO-3 (its hooks gather and reduce per module call: a module run twice reduces its gradient twice).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import DynamicCache

from k2rl.model.routing import Replay

MIN_SHARED_TOKENS = 16  # below this, a second forward pass costs more than it saves


def shared_prefix_length(input_ids: list[torch.Tensor], routed: list[torch.Tensor] | None = None) -> int:
    """Leading tokens every sequence has in common (and, with routing replay, vLLM's experts for them),
    leaving each sequence at least one token of its own; 0 for one sequence or a short prefix."""
    if len(input_ids) < 2:
        return 0
    limit = min(len(s) for s in input_ids) - 1
    first = input_ids[0][:limit]
    agree = torch.stack([s[:limit] == first for s in input_ids[1:]]).all(0)
    if routed is not None:
        lead = routed[0][:limit]
        agree &= torch.stack([r[:limit] == lead for r in routed[1:]]).flatten(2).all(-1).all(0)
    shared = int(agree.long().cumprod(0).sum())
    return shared if shared >= MIN_SHARED_TOKENS else 0


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under `logits` ([..., V] -> [...]), log-softmax in fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]


@contextmanager
def _scored_positions(module, positions: torch.Tensor):
    """Within it, a forward of `module` projects only the hidden states at `positions` (bool [B, L]) to
    the vocabulary: its logits are [N, V], the positions in row-major order. The projection and its fp32
    log-softmax grow with the vocabulary (K2's 164k entries: 0.66 MB of logits per token), and a loss
    reads only the tokens the policy generated, not the prompt's or the tools' results (k2-tiny's demo
    SFT step: 1.10x, scripts/bench_cpu_step.py)."""
    head = getattr(module, "module", module).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _, args: (args[0][positions], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """`values` in the row-major True positions of `where`, 0.0 elsewhere (differentiable)."""
    return values.new_zeros(where.shape).masked_scatter(where, values)


def padded_logprobs(module, ids: torch.Tensor, attention_mask: torch.Tensor, shared: int = 0,
                    replay: Replay | None = None, wanted: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] logprob of each token given the ones before (position 0: 0.0) for right-padded `ids`
    under `module` (a causal LM or its engine). With `shared` > 0 the first `shared` tokens are the same
    in every row and run once; `replay` is the routing replay of the enclosing block, if any. With
    `wanted` (bool [B, L], e.g. a loss mask) only those tokens are scored, the others come back 0.0."""
    if wanted is None:
        wanted = torch.ones_like(ids, dtype=torch.bool)
    wanted = wanted.clone()
    wanted[:, 0] = False  # the first token has no logprob
    scores = torch.nn.functional.pad(wanted[:, 1:], (0, 1))  # position t scores token t + 1
    if shared:
        return _shared_prefix_logprobs(module, ids, attention_mask, shared, replay, wanted, scores)
    with _scored_positions(module, scores):
        logits = module(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    return _scatter(token_logprobs(logits, ids[wanted]), wanted)


def _shared_prefix_logprobs(module, ids: torch.Tensor, attention_mask: torch.Tensor, shared: int,
                            replay: Replay | None, wanted: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    batch = ids.shape[0]
    config = getattr(module, "module", module).config
    cache = DynamicCache(config=config)
    if replay is not None:
        replay.use(slice(0, 1), slice(0, shared))
    prefix_scores = scores[:, :shared].any(0, keepdim=True)  # run once: it scores what any row wants
    with _scored_positions(module, prefix_scores):
        prefix_logits = module(input_ids=ids[:1, :shared], past_key_values=cache, use_cache=True).logits
    cache.batch_repeat_interleave(batch)
    if replay is not None:
        replay.use(slice(None), slice(shared, None))
    with _scored_positions(module, scores[:, shared:]):
        rest_logits = module(input_ids=ids[:, shared:], attention_mask=attention_mask, past_key_values=cache,
                             use_cache=True).logits
    in_prefix = prefix_scores[0, :-1]  # positions scoring the prefix's own tokens 1 .. shared - 1
    boundary_scored = bool(prefix_scores[0, -1])  # the prefix's last position scores each row's first own token
    prefix = _scatter(token_logprobs(prefix_logits[:-1] if boundary_scored else prefix_logits,
                                     ids[0, 1:shared][in_prefix]), in_prefix)
    boundary = (torch.log_softmax(prefix_logits[-1].float(), dim=-1)[ids[:, shared]] if boundary_scored
                else prefix.new_zeros(batch))
    rest = _scatter(token_logprobs(rest_logits, ids[:, shared + 1:][wanted[:, shared + 1:]]), wanted[:, shared + 1:])
    logp = torch.cat([prefix.new_zeros(batch, 1), prefix.expand(batch, -1), boundary[:, None], rest], dim=1)
    return logp * wanted  # the prefix was scored for every row that shares it
