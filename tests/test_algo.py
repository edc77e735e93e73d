"""Each objective against a value computed by hand on a tiny batch."""
import math

import pytest
import torch

from k2rl.algo import (batch_normalized, group_centered, group_normalized, k2_loss, pg_clip_loss, sft_loss,
                       temperature_at, truncated_is_weights)
from k2rl.config import TemperatureSchedule

# Two sequences, three token slots; the second sequence generated only two tokens.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0]])
OLD = torch.tensor([[-1.1, -2.0, -0.4], [-0.4, -0.3, -1.0]])


def test_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert group_centered(r).tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    g = group_normalized(r)
    assert torch.allclose(g[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5) and g[1].abs().max() == 0
    b = batch_normalized(torch.tensor([0.0, 2.0]))
    assert torch.allclose(b, torch.tensor([-1.0, 1.0]), atol=1e-5)


def test_k2_loss_by_hand():
    adv = torch.tensor([0.5, -0.5])
    tau = 0.1
    # log ratios: seq0 = 0.1 + 0 - 0.1 = 0.0; seq1 = 0.2 + 0 = 0.2 (masked slot ignored)
    expected = ((0.5 - tau * 0.0) ** 2 + (-0.5 - tau * 0.2) ** 2) / 2
    loss, stats = k2_loss(LOGP, OLD, MASK, adv, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["loss/log_ratio_abs"] == pytest.approx(0.1, rel=1e-5)


def test_k2_loss_gradient_pushes_toward_positive_advantage():
    logp = LOGP.clone().requires_grad_(True)
    k2_loss(logp, OLD, MASK, torch.tensor([1.0, -1.0]), tau=0.5)[0].backward()
    assert (logp.grad[0] < 0).all()  # minimizing raises logp of the good sample
    assert (logp.grad[1, :2] > 0).all() and logp.grad[1, 2] == 0


def test_pg_clip_loss_by_hand():
    adv = torch.tensor([1.0, -1.0])
    eps = 0.2
    r = torch.exp((LOGP - OLD) * MASK)
    tok = [[-min(r[0, j].item() * 1, min(max(r[0, j].item(), 0.8), 1.2) * 1) for j in range(3)],
           [-min(r[1, j].item() * -1, min(max(r[1, j].item(), 0.8), 1.2) * -1) for j in range(2)]]
    token_mean = (sum(tok[0]) + sum(tok[1])) / 5
    seq_mean = (sum(tok[0]) / 3 + sum(tok[1]) / 2) / 2
    assert pg_clip_loss(LOGP, OLD, MASK, adv, eps, "token")[0].item() == pytest.approx(token_mean, rel=1e-6)
    assert pg_clip_loss(LOGP, OLD, MASK, adv, eps, "sequence")[0].item() == pytest.approx(seq_mean, rel=1e-6)


def test_kl_term_is_k3_and_needs_reference():
    ref = OLD.clone()
    base = pg_clip_loss(LOGP, OLD, MASK, torch.zeros(2), 0.2)[0]
    with_kl, stats = pg_clip_loss(LOGP, OLD, MASK, torch.zeros(2), 0.2, kl_coef=0.5, ref_logp=ref)
    d = (ref - LOGP) * MASK
    k3 = ((torch.exp(d) - d - 1) * MASK).sum() / MASK.sum()
    assert with_kl.item() == pytest.approx(base.item() + 0.5 * k3.item(), rel=1e-6)
    with pytest.raises(ValueError, match="reference"):
        pg_clip_loss(LOGP, OLD, MASK, torch.zeros(2), 0.2, kl_coef=0.1)


def test_truncated_is_weights_cap_and_mask():
    rollout = OLD - torch.tensor([[0.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    w = truncated_is_weights(OLD, rollout, MASK, cap=2.0)
    assert w[0].tolist() == pytest.approx([1.0, 2.0, math.exp(-1)], rel=1e-6)
    assert w[1, 2] == 0


def test_sft_loss_is_masked_nll():
    assert sft_loss(LOGP, MASK).item() == pytest.approx((1 + 2 + 0.5 + 0.2 + 0.3) / 5)


@pytest.mark.parametrize("kind, mid", [("linear", 0.75), ("cosine", 0.75), ("exponential", math.sqrt(0.5))])
def test_temperature_decay(kind, mid):
    s = TemperatureSchedule(start=1.0, end=0.5, decay_steps=10, kind=kind)
    assert temperature_at(0, s) == pytest.approx(1.0)
    assert temperature_at(5, s) == pytest.approx(mid)
    assert temperature_at(10, s) == pytest.approx(0.5) and temperature_at(50, s) == pytest.approx(0.5)
