"""The max-logit recorder (k2rl.model.attention): its chunked causal pass equals the max over the full
score matrix, and the model with it matches transformers' eager attention in outputs, gradients and
maxima (the eager softmax inputs of the real tokens' rows), with and without padding."""
import gc
import weakref

import pytest
import torch

from k2rl.model import attention
from k2rl.model.attention import causal_head_max
from k2rl.model.checkpoint import load_model
from k2rl.model.modeling import head_max_logits, reset_max_logits

HEADS, HEAD_DIM = 4, 96  # k2-tiny: 4 heads, q/k of qk_nope 32 + qk_rope 64


def _full_scores_max(query, key, allowed, scaling):
    """The recorder this one replaced: every score in fp32, masked, then the max."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    return scores.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))


def _qk(q_len, k_len, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, HEADS, q_len, HEAD_DIM, generator=g)
    key = torch.randn(batch, HEADS, k_len, HEAD_DIM, generator=g)
    # A huge logit that causality forbids: the first query with the last key, in every head.
    key[:, :, -1] = 50 * query[:, :, 0]
    return query, key


@pytest.mark.parametrize("chunk_bytes", [1, 64 << 10, 1 << 30])  # one row per chunk, a few rows, MIN_CHUNKS
@pytest.mark.parametrize("q_len, k_len", [(17, 17), (300, 300), (5, 40)])  # (5, 40): a cache of 35 keys
def test_causal_pass_equals_full_scores(monkeypatch, chunk_bytes, q_len, k_len):
    monkeypatch.setattr(attention, "CHUNK_SCORE_BYTES", chunk_bytes)
    query, key = _qk(q_len, k_len)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    want = _full_scores_max(query, key, allowed, 0.1)
    torch.testing.assert_close(causal_head_max(query, key, None, 0.1), want)  # fp32: to summation order
    assert want.max() < 50 * HEAD_DIM * 0.1 / 4  # the planted logit stayed out


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_padding_keys_and_padding_rows_stay_out(monkeypatch, additive):
    monkeypatch.setattr(attention, "CHUNK_SCORE_BYTES", 64 << 10)
    query, key = _qk(300, 300)
    lengths = torch.tensor([300, 180])
    query[1, :, 250] = 50 * key[1, :, 20]  # a padding row (its own key masked) that loves a real key it sees
    query[1, :, 260] = 50 * key[1, :, 270]  # and one that loves a padding key
    causal = torch.ones(300, 300, dtype=torch.bool).tril()
    real = torch.arange(300) < lengths[:, None]  # [B, positions]
    mask = (causal & real[:, None, :])[:, None]  # [B, 1, q, k]: what sdpa_mask builds, pad rows see real keys
    want = _full_scores_max(query, key, mask & real[:, None, :, None], 0.1)
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(causal_head_max(query, key, mask, 0.1), want)
    assert want.max() < 50 * HEAD_DIM * 0.1 / 4  # neither planted logit got in
    assert _full_scores_max(query, key, causal, 0.1).max() > 50 * HEAD_DIM * 0.1 / 4  # causal alone lets them in


@pytest.mark.parametrize("layout, split", [("right", True), ("right, cached prefix", True), ("left", False),
                                           ("two documents", False)])
def test_every_mask_layout_gives_the_full_scores_max(monkeypatch, layout, split):
    """Right padding (the trainer's, also after a cached shared prefix) takes the split pass: the keys
    a chunk's rows all see go unmasked. Left padding and packed documents, where a real row may not see
    an earlier key, mask whole blocks. Both equal the max over the full masked score matrix."""
    monkeypatch.setattr(attention, "CHUNK_SCORE_BYTES", 64 << 10)
    q_len, k_len = (200, 260) if "cached" in layout else (300, 300)
    offset = k_len - q_len
    query, key = _qk(q_len, k_len)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(offset)
    keys = torch.ones(2, k_len, dtype=torch.bool)
    if layout == "left":
        keys[1, :70] = False
    elif layout != "two documents":
        keys[1, k_len - 90:] = False
    mask = causal & keys[:, None, :]
    if layout == "two documents":  # the second document's rows do not see the first's keys
        mask[1, 150 - offset:, :150] = False
    query[1, :, 120] = 50 * key[1, :, 40]  # a planted logit across the left padding / the document border
    query[1, :, -5] = 50 * key[1, :, -1]  # a padding row (right padding) or a real one (left)
    mask = mask[:, None]
    rows = mask.diagonal(offset=offset, dim1=-2, dim2=-1)[..., None]
    assert attention._real_rows_see_every_earlier_key(mask, offset) is split
    torch.testing.assert_close(causal_head_max(query, key, mask, 0.1), _full_scores_max(query, key, mask & rows, 0.1))


@pytest.mark.parametrize("padded", [False, True])
def test_each_rows_first_hidden_key_stays_out(monkeypatch, padded):
    """Every row loves the key just past its causal frontier, which it may not see: the split pass must
    stop each chunk's unmasked part at its first row, key for key."""
    monkeypatch.setattr(attention, "CHUNK_SCORE_BYTES", 64 << 10)
    g = torch.Generator().manual_seed(0)
    key = torch.randn(2, HEADS, 130, HEAD_DIM, generator=g)
    query = torch.randn(2, HEADS, 100, HEAD_DIM, generator=g)
    query[:, :, :-1] += 10 * key[:, :, 31:]  # row r (position r + 30) and key r + 31
    allowed = torch.ones(100, 130, dtype=torch.bool).tril(30)
    mask = allowed.expand(2, 1, 100, 130).clone() if padded else None
    want = _full_scores_max(query, key, allowed, 0.1)
    torch.testing.assert_close(causal_head_max(query, key, mask, 0.1), want)
    one_more = torch.ones(100, 130, dtype=torch.bool).tril(31)
    assert _full_scores_max(query, key, one_more, 0.1).max() > 2 * want.max()  # one key further lets them in


def _forward_backward(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    (logits.float().logsumexp(-1) * mask).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padded", [False, True])
def test_model_matches_eager_attention(tiny_model_dir, monkeypatch, padded):
    """Outputs, gradients and maxima equal transformers' eager path (which materialises the scores)."""
    monkeypatch.setattr(attention, "CHUNK_SCORE_BYTES", 256 << 10)  # several chunks per layer
    model = load_model(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 160:] = 0
    reset_max_logits(model)
    logits, grads = _forward_backward(model, ids, mask)
    recorded = head_max_logits(model)
    assert recorded.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)

    softmax_inputs = []
    real_softmax = torch.nn.functional.softmax

    def spy(x, *args, **kwargs):
        if x.dim() == 4:  # the eager scores, less the padding positions' own rows
            rows = mask.bool()[:, None, :, None]
            softmax_inputs.append(x.detach().masked_fill(~rows, float("-inf")).amax(dim=(0, 2, 3)))
        return real_softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "softmax", spy)
    model.config._attn_implementation = "eager"
    eager_logits, eager_grads = _forward_backward(model, ids, mask)
    torch.testing.assert_close(recorded, torch.stack(softmax_inputs), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    torch.testing.assert_close(grads, eager_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_checkpoint_recompute_records_nothing_more(tiny_model_dir, monkeypatch, device):
    """Under gradient checkpointing the max pass runs in the forward only, not again in the backward's
    recompute (on CUDA the backward runs on the autograd engine's device thread), and records the same
    maxima as without checkpointing."""
    passes, attentions = [], []
    real_pass, real_sdpa = attention.causal_head_max, attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "causal_head_max", lambda *a: passes.append(1) or real_pass(*a))
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: attentions.append(1) or real_sdpa(*a, **k))
    model = load_model(tiny_model_dir).to(device).train()
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    maxima = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        reset_max_logits(model)
        passes.clear()
        attentions.clear()
        _forward_backward(model, ids, mask)
        assert len(attentions) == (2 if checkpointing else 1) * layers  # the backward recomputed each layer
        assert len(passes) == layers
        maxima.append(head_max_logits(model))
    torch.testing.assert_close(maxima[0], maxima[1], rtol=0, atol=0)


def test_cpu_takes_the_flash_kernel(tiny_model_dir):
    """MLA's values (32 wide) are narrower than q and k (96): zero-padded, SDPA runs its flash kernel on
    the CPU, not the math one (equal results: test_model_matches_eager_attention)."""
    model = load_model(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.profiler.profile() as prof:
        _forward_backward(model, ids, mask)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_eval_passes_record_nothing(tiny_model_dir):
    """Only training-mode forwards pay for the max pass (logprob and reference passes run in eval)."""
    model = load_model(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    reset_max_logits(model)
    with torch.no_grad():
        model.eval()(ids)
        assert head_max_logits(model) is None
        model.train()(ids)
    assert head_max_logits(model) is not None


def test_autocast_scores_the_inputs_sdpa_gets():
    """Under bf16 autocast SDPA runs on bf16 q and k: the max is of their exact products."""
    query, key = _qk(64, 64)
    allowed = torch.ones(64, 64, dtype=torch.bool).tril()
    want = _full_scores_max(query.bfloat16(), key.bfloat16(), allowed, 0.1)
    assert not torch.equal(want, _full_scores_max(query, key, allowed, 0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(causal_head_max(query, key, None, 0.1), want)


@pytest.mark.gpu
def test_cuda_pass_under_autocast_keeps_fp32_scores():
    """On CUDA the bf16 q/k multiply on tensor cores with fp32 output: the max equals the fp32 product
    of the same bf16 values up to accumulation order."""
    query, key = (t.cuda() for t in _qk(2048, 2048))
    allowed = torch.ones(2048, 2048, dtype=torch.bool, device="cuda").tril()
    want = _full_scores_max(query.bfloat16(), key.bfloat16(), allowed, 0.1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = causal_head_max(query, key, None, 0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_layout_check_does_not_keep_the_mask_alive():
    """The check is remembered for the forward's other layers, not held: on the GPU a kept mask would
    stay in memory through the rollout phase."""
    query, key = _qk(32, 32)
    mask = torch.ones(32, 32, dtype=torch.bool).tril().expand(2, 1, 32, 32).clone()
    causal_head_max(query, key, mask, 0.1)
    alive = weakref.ref(mask)
    del mask
    gc.collect()
    assert alive() is None
