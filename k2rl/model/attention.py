"""SDPA attention that also records each head's max pre-softmax logit, for QK-Clip.

The output is torch's scaled_dot_product_attention (flash / memory-efficient kernels: the score matrix
is never stored). The max comes from a separate pass under no_grad over chunks of query rows, so at
most one chunk's scores exist at a time, and each chunk stops at its causal frontier (the keys no row
of the chunk may see are never multiplied). Under autocast q and k are scored in autocast's dtype,
as SDPA gets them; the scores themselves are fp32 (on CUDA: bf16 tensor cores with fp32 output), as
QK-Clip compares them with tau.

Recording happens only in training mode (train steps: QK-Clip and the attn/max_logit metric); eval
and logprob passes run plain SDPA, and so does gradient checkpointing's recompute in the backward (the
pass costs 28 ms a forward, which a 545 ms checkpointed k2-mini step on the H200 ran twice). The model
is a causal decoder: the pass assumes every mask it gets is causal (as `sdpa_mask` builds it), with
padding on top. Rows of padding positions are left out of the max (recognised as rows whose own key
is masked): their queries are of pad tokens, which no loss reads, yet they see the real keys before
them; QK-Clip should answer to the batch's tokens only.

On the CPU, SDPA with MLA's value head (v_head_dim) narrower than the query's runs its math kernel:
the whole [B, H, L, L] score and probability matrices, kept for backward, and a "safe" softmax of
several passes. With the values zero-padded to the query's head dim it takes the flash kernel (tiled,
nothing of size L x L stored), equal to fp32 rounding: at k2-tiny's shapes (4 x 886 tokens, padding
mask) the attention's forward is 2.8x faster, its backward 1.1x (scripts/bench_cpu_step.py).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

MAX_LOGIT_ATTENTION = "k2rl_sdpa_max_logit"
MAX_LOGIT_ATTR = "k2rl_max_logit"

# Largest fp32 score block of one chunk; and the fewest chunks per sequence, so that the causal
# frontier skips a good share of the products: with n chunks about (n - 1) / 2n of them (44% at 8).
CHUNK_SCORE_BYTES = 128 << 20
MIN_CHUNKS = 8


def _fp32_scores(query: torch.Tensor, key_t: torch.Tensor) -> torch.Tensor:
    """query [B, H, q, D] @ key_t [B, H, D, k] in fp32 (bf16/fp16 on CUDA: tensor cores, fp32 output)."""
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        b, h, q, d = query.shape
        out = torch.bmm(query.reshape(b * h, q, d), key_t.reshape(b * h, d, -1), out_dtype=torch.float32)
        return out.view(b, h, q, -1)
    return torch.matmul(query.float(), key_t.float())


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min


def _real_rows_see_every_earlier_key(attention_mask: torch.Tensor, offset: int) -> bool:
    """True when every row whose own key is allowed (a real token's) may see every key up to its own
    position: causal with right padding (what the trainer builds), with or without a cached prefix;
    False for left padding or packed documents."""
    allowed = _allowed(attention_mask)
    q_len, k_len = allowed.shape[-2:]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=allowed.device).tril(offset)
    own = allowed.diagonal(offset=offset, dim1=-2, dim2=-1)
    return bool((allowed | ~causal | ~own[..., None]).all())


# The last mask checked (weakly: it must not outlive its forward on the GPU) and its answer: every
# layer of a forward gets the same mask object, so the check (one pass over the mask, one host sync)
# runs once per forward, not once per layer.
_last_check: tuple[weakref.ref | None, int, bool] = (None, 0, False)


def _right_padded(attention_mask: torch.Tensor, offset: int) -> bool:
    global _last_check
    mask, checked_offset, answer = _last_check
    if mask is None or mask() is not attention_mask or checked_offset != offset:
        answer = _real_rows_see_every_earlier_key(attention_mask, offset)
        _last_check = (weakref.ref(attention_mask), offset, answer)
    return answer


@torch.no_grad()
def causal_head_max(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float) -> torch.Tensor:
    """[H] max over batch and allowed (query, key) pairs of q.k * scaling; causal when no mask is given.

    Masking costs a write over the scores, so it is kept to where it matters: when real rows see every
    key before them (no mask, or right padding), a chunk's keys up to its first row's position are
    seen by all its rows and are reduced unmasked; only the triangle after them is masked, and the
    rows of padding are dropped from the per-row maxima. Other masks take the whole block masked."""
    if torch.is_autocast_enabled(query.device.type):  # score what SDPA sees: q and k in autocast's dtype
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key = query.to(dtype), key.to(dtype)
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[-2]
    offset = k_len - q_len  # queries are the last q_len positions (a cache may hold earlier keys)
    rows = max(1, min(-(-q_len // MIN_CHUNKS), CHUNK_SCORE_BYTES // (4 * batch * heads * k_len)))
    key_t = key.transpose(-1, -2)
    split = attention_mask is None or _right_padded(attention_mask, offset)
    best = torch.full((heads,), float("-inf"), device=query.device)
    with torch.autocast(query.device.type, enabled=False):
        for start in range(0, q_len, rows):
            stop = min(start + rows, q_len)
            seen = min(k_len, stop + offset)  # keys beyond the chunk's last row are masked for all rows
            scores = _fp32_scores(query[:, :, start:stop], key_t[..., :seen]) * scaling
            if attention_mask is None:
                allowed = (torch.arange(seen, device=query.device)
                           <= torch.arange(start, stop, device=query.device)[:, None] + offset)
                own = None
            else:
                allowed = _allowed(attention_mask[..., start:stop, :seen])
                own = allowed.diagonal(offset=start + offset, dim1=-2, dim2=-1)  # each row's own position
            if split:
                common = min(seen, start + offset + 1)  # keys every row of the chunk sees
                row_max = scores[..., :common].amax(dim=-1)
                if common < seen:
                    triangle = scores[..., common:].masked_fill_(~allowed[..., common:], float("-inf"))
                    row_max = torch.maximum(row_max, triangle.amax(dim=-1))
                if own is not None:
                    row_max.masked_fill_(~own, float("-inf"))
                best = torch.maximum(best, row_max.amax(dim=(0, 2)))
            else:
                scores.masked_fill_(~(allowed & own[..., None]), float("-inf"))
                best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
    return best


def _cpu_flash_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """SDPA with the values zero-padded to the query's head dim (and the output cut back): the CPU
    flash kernel takes equal head dims only, and computes the same as the math kernel, mask and all."""
    v_dim = value.shape[-1]
    value = F.pad(value, (0, query.shape[-1] - v_dim))
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return out[..., :v_dim], None


def _recomputing() -> bool:
    """True inside a backward pass: the only forward that runs there is gradient checkpointing's
    recompute, whose maxima the first forward already recorded (same inputs, same scores)."""
    return torch._C._current_graph_task_id() != -1


def max_logit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA; in training mode also keeps a running per-head max logit on the attention module (once a
    forward: not again in gradient checkpointing's recompute)."""
    if module.training and not _recomputing():
        head_max = causal_head_max(query, key, attention_mask, scaling)
        previous = getattr(module, MAX_LOGIT_ATTR, None)
        setattr(module, MAX_LOGIT_ATTR, head_max if previous is None else torch.maximum(previous, head_max))
    if query.device.type == "cpu" and value.shape[-1] < query.shape[-1]:
        return _cpu_flash_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(MAX_LOGIT_ATTENTION, max_logit_attention)
AttentionMaskInterface.register(MAX_LOGIT_ATTENTION, sdpa_mask)
