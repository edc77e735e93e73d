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


def padded_logprobs(module, ids: torch.Tensor, attention_mask: torch.Tensor, shared: int = 0,
                    replay: Replay | None = None) -> torch.Tensor:
    """[B, L] logprob of each token given the ones before (position 0: 0.0) for right-padded `ids`
    under `module` (a causal LM or its engine). With `shared` > 0 the first `shared` tokens are the same
    in every row and run once; `replay` is the routing replay of the enclosing block, if any."""
    if shared:
        return _shared_prefix_logprobs(module, ids, attention_mask, shared, replay)
    logits = module(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    return torch.cat([torch.zeros(ids.shape[0], 1, device=ids.device), token_logprobs(logits[:, :-1], ids[:, 1:])], dim=1)


def _shared_prefix_logprobs(module, ids: torch.Tensor, attention_mask: torch.Tensor, shared: int,
                            replay: Replay | None) -> torch.Tensor:
    batch = ids.shape[0]
    config = getattr(module, "module", module).config
    cache = DynamicCache(config=config)
    if replay is not None:
        replay.use(slice(0, 1), slice(0, shared))
    prefix_logits = module(input_ids=ids[:1, :shared], past_key_values=cache, use_cache=True).logits[0]
    cache.batch_repeat_interleave(batch)
    if replay is not None:
        replay.use(slice(None), slice(shared, None))
    rest_logits = module(input_ids=ids[:, shared:], attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True).logits
    prefix = token_logprobs(prefix_logits[:-1], ids[0, 1:shared]).expand(batch, -1)
    boundary = torch.log_softmax(prefix_logits[-1].float(), dim=-1)[ids[:, shared]]  # each row's first own token
    rest = token_logprobs(rest_logits[:, :-1], ids[:, shared + 1:])
    return torch.cat([prefix.new_zeros(batch, 1), prefix, boundary[:, None], rest], dim=1)
