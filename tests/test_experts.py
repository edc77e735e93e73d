"""MoE experts as grouped GEMMs (k2rl.model.experts): the same outputs and gradients as transformers'
per-expert loop, bf16 GEMMs under autocast with fp32 weights, and the TrainEngine switch."""
import pytest
import torch

from k2rl.config import JobConfig
from k2rl.engines.train import TokenBatch, TrainEngine
from k2rl.model.checkpoint import load_model
from k2rl.model.experts import GROUPED_MM_AUTOCAST, set_experts_implementation

CPU = torch.device("cpu")


def _forward_backward(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ids(model, shape=(2, 64)):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))


def _grouped_mm_weight_dtypes(monkeypatch) -> list:
    """Spy on torch's grouped GEMM (transformers looks it up at call time): the weight dtypes it gets."""
    seen, real = [], torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda a, b, **kw: seen.append(b.dtype) or real(a, b, **kw))
    return seen


def test_grouped_mm_matches_the_per_expert_loop(tiny_model_dir, monkeypatch):
    model = load_model(tiny_model_dir)
    ids = _ids(model)
    assert set_experts_implementation(model, "eager", CPU) == "eager"
    logits, grads = _forward_backward(model, ids)
    seen = _grouped_mm_weight_dtypes(monkeypatch)
    assert set_experts_implementation(model, "grouped_mm", CPU) == "grouped_mm"
    assert model.model.layers[1].mlp.experts.config._experts_implementation == GROUPED_MM_AUTOCAST
    grouped_logits, grouped_grads = _forward_backward(model, ids)
    assert seen and set(seen) == {torch.float32}  # the grouped path really ran
    torch.testing.assert_close(grouped_logits, logits)
    assert grouped_grads.keys() == grads.keys()  # expert stacks [E, ...] are the same parameters
    torch.testing.assert_close(grouped_grads, grads)


def test_grouped_mm_runs_in_bf16_under_autocast(tiny_model_dir, monkeypatch):
    """fp32 master weights (MuonClip) under bf16 autocast: the grouped GEMMs get bf16 weights, as the
    per-expert loop's linears do, and the gradients reach the fp32 stacks."""
    model = load_model(tiny_model_dir)
    ids = _ids(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        set_experts_implementation(model, "eager", CPU)
        logits, grads = _forward_backward(model, ids)
        seen = _grouped_mm_weight_dtypes(monkeypatch)
        set_experts_implementation(model, "grouped_mm", CPU)
        grouped_logits, grouped_grads = _forward_backward(model, ids)
    assert seen and set(seen) == {torch.bfloat16}
    experts = "model.layers.1.mlp.experts.gate_up_proj"
    assert grouped_grads[experts].dtype == torch.float32 and grouped_grads[experts].abs().sum() > 0
    torch.testing.assert_close(grouped_logits, logits, rtol=2e-2, atol=2e-2)


def test_row_permutations_have_exact_gradients():
    """The gathers between token order and expert order pass float64 gradcheck (their backwards are
    gathers through the inverse permutation, not autograd's scatter)."""
    from k2rl.model.experts import _RowsToTokens, _TokensToRows

    gen = torch.Generator().manual_seed(0)
    tokens, top_k, width = 5, 3, 4
    order = torch.sort(torch.randint(0, 7, (tokens * top_k,), generator=gen), stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    x = torch.randn(tokens, width, dtype=torch.float64, generator=gen, requires_grad=True)
    rows = torch.randn(tokens * top_k, width, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _TokensToRows.apply(t, order, inverse, top_k), (x,))
    assert torch.autograd.gradcheck(lambda r: _RowsToTokens.apply(r, order, inverse), (rows,))
    torch.testing.assert_close(_TokensToRows.apply(x, order, inverse, top_k), x[order // top_k], rtol=0, atol=0)
    torch.testing.assert_close(_RowsToTokens.apply(rows, order, inverse)[order], rows, rtol=0, atol=0)


def test_auto_picks_by_device_and_bad_names_fail(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert set_experts_implementation(model, "auto", torch.device("cuda")) == "grouped_mm"
    assert set_experts_implementation(model, "auto", CPU) == "eager"
    assert model.config._experts_implementation == "eager"
    with pytest.raises(ValueError, match="train.experts_implementation"):
        set_experts_implementation(model, "batched", CPU)


def test_train_engine_applies_the_choice(tiny_model_dir, world_of_one):
    job = JobConfig(optimizer={"name": "adamw", "lr": 1e-3}, train={"experts_implementation": "grouped_mm"})
    engine = TrainEngine(tiny_model_dir, job)
    assert engine.model.config._experts_implementation == GROUPED_MM_AUTOCAST
    batch = TokenBatch.from_lists([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    stats = engine.train_step(batch, lambda lps, mb: (-torch.cat(lps).sum() / 7, {}))
    assert stats["grad_norm"] > 0 and stats["attn/max_logit"] > 0


@pytest.mark.gpu
def test_grouped_mm_on_cuda_matches_the_loop_in_bf16_autocast(tiny_model_dir):
    model = load_model(tiny_model_dir).cuda()
    ids = _ids(model, (4, 512)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        set_experts_implementation(model, "eager", ids.device)
        logits, grads = _forward_backward(model, ids)
        set_experts_implementation(model, "auto", ids.device)
        grouped_logits, grouped_grads = _forward_backward(model, ids)
    torch.testing.assert_close(grouped_logits, logits, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=5e-2, atol=1e-3, msg=name)
