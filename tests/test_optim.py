"""MuonClip's update against a plain fp64 transcription of the K2 formulas, its parameter split on
k2-tiny, and its state round trip."""
import copy
import math

import pytest
import torch

from k2rl.config import OptimizerConfig
from k2rl.model.checkpoint import load_model
from k2rl.optim import MuonClip, build_optimizer, move_optimizer_state, muonclip_param_groups
from k2rl.optim.newton_schulz import COEFFS

LR, WD, MU = 0.02, 0.1, 0.95


def reference_ns5(g: torch.Tensor) -> torch.Tensor:
    """BRIEF.md's NewtonSchulz5 on one 2-D matrix, fp64, no tricks."""
    a, b, c = COEFFS
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(5):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def reference_muon(w, grads, rows):
    """W_t = W - lr (0.2 sqrt(max(n, m)) NS5(G + mu M_t) + wd W), M_t = mu M + G, per `rows`-row matrix."""
    w, m = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for g in grads:
        m = MU * m + g.double()
        u = (g.double() + MU * m).view(-1, rows, w.shape[-1])
        o = torch.stack([reference_ns5(mat) for mat in u]).view_as(w)
        w = w - LR * (0.2 * math.sqrt(max(rows, w.shape[-1])) * o + WD * w)
    return w


SHAPES = {  # name: (shape, rows of one matrix)
    "tall": ((96, 24), 96),
    "wide": ((24, 96), 24),
    "square": ((40, 40), 40),
    "experts_gate_up": ((3, 2 * 16, 48), 16),
    "experts_down": ((3, 48, 16), 48),
}


def _run_muon(dtype, steps=3):
    """{name: (start, MuonClip result, reference result)} after `steps` steps on random gradients."""
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.randn(shape, generator=gen) for k, (shape, _) in SHAPES.items()}
    grads = {k: [torch.randn(shape, generator=gen) for _ in range(steps)] for k, (shape, _) in SHAPES.items()}
    live = {k: torch.nn.Parameter(p.clone()) for k, p in start.items()}
    opt = MuonClip([dict(params=list(live.values()), use_muon=True, matrix_rows=[r for _, r in SHAPES.values()])],
                   lr=LR, weight_decay=WD, momentum=MU, ns_dtype=dtype)
    for i in range(steps):
        for k, p in live.items():
            p.grad = grads[k][i]
        opt.step()
    return {k: (start[k].double(), live[k].detach().double(), reference_muon(start[k], grads[k], SHAPES[k][1]))
            for k in SHAPES}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_muon_update_matches_reference(dtype, tol):
    for name, (start, got, ref) in _run_muon(dtype).items():
        err = (got - ref).norm() / (ref - start).norm()
        assert err < tol, f"{name}: relative error of the update {err:.2e}"


def test_adamw_part_matches_torch_adamw():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(50))
    theirs.data.copy_(ours.data)
    opt = MuonClip([dict(params=[ours], use_muon=False)], lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW([theirs], lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        g = torch.randn(50)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_refuses_flat_partitions_it_has_no_layout_for():
    p = torch.nn.Parameter(torch.randn(8, 16))
    opt = MuonClip([dict(params=[p], use_muon=True, matrix_rows=[8])], lr=LR)
    flat = torch.nn.Parameter(p.detach().flatten()[:64])  # what ZeRO-1 puts in the group: a flat partition
    flat.grad = torch.randn(64)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="attach_zero"):
        opt.step()


def test_param_split_on_k2_tiny(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, other = muonclip_param_groups(model.named_parameters())
    muon_names = [names[id(p)] for p in muon["params"]]
    other_names = {names[id(p)] for p in other["params"]}
    assert any("embed_tokens" in n for n in other_names) and any("lm_head" in n for n in other_names)
    assert all(model.get_parameter(n).ndim == 1 for n in other_names if "embed" not in n and "lm_head" not in n)
    rows = dict(zip(muon_names, muon["matrix_rows"]))
    gate_up = next(n for n in rows if n.endswith("experts.gate_up_proj"))
    assert rows[gate_up] == model.config.moe_intermediate_size  # gate and up: separate matrices
    assert any(n.endswith("mlp.gate.weight") for n in rows)  # the router is a matrix too
    assert len(muon_names) + len(other_names) == len(list(model.parameters()))


def test_build_optimizer_by_name_and_rejects_low_precision(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32)
    assert isinstance(build_optimizer(model, OptimizerConfig(name="muonclip")), MuonClip)
    assert isinstance(build_optimizer(model, OptimizerConfig(name="adamw")), torch.optim.AdamW)
    assert build_optimizer(model, OptimizerConfig()).ns_dtype == torch.float32  # auto on the CPU
    # auto follows where the step will run, not where the model is while the optimizer is built: a
    # trainer builds it on the host before DeepSpeed moves the model (NS in fp32 on an H200: 0.5 s a step)
    assert build_optimizer(model, OptimizerConfig(), device=torch.device("cuda")).ns_dtype == torch.float16
    assert build_optimizer(model, OptimizerConfig(ns_dtype="bfloat16")).ns_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp32 master"):
        build_optimizer(model.to(torch.bfloat16), OptimizerConfig())


def _train(model, opt, steps):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip(tiny_model_dir):
    cfg = OptimizerConfig(lr=1e-2)
    straight = load_model(tiny_model_dir, torch.float32)
    _train(straight, build_optimizer(straight, cfg), 2)
    resumed = load_model(tiny_model_dir, torch.float32)
    first = build_optimizer(resumed, cfg)
    _train(resumed, first, 1)
    saved = copy.deepcopy(first.state_dict())
    second = build_optimizer(resumed, cfg)
    second.load_state_dict(saved)
    _train(resumed, second, 1)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_state_offload_and_reload_on_gpu():
    p = torch.nn.Parameter(torch.randn(64, 128, device="cuda"))
    opt = MuonClip([dict(params=[p], use_muon=True, matrix_rows=[64])], lr=LR)
    p.grad = torch.randn_like(p)
    opt.step()
    before = opt.state[p]["momentum_buffer"].clone()
    move_optimizer_state(opt, "cpu")
    assert opt.state[p]["momentum_buffer"].device.type == "cpu" and opt.state[p]["momentum_buffer"].is_pinned()
    move_optimizer_state(opt, "cuda")
    assert torch.equal(opt.state[p]["momentum_buffer"], before)
