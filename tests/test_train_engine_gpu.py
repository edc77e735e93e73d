"""TrainEngine on a GPU with MuonClip: fp32 master weights, bf16 autocast compute, QK-Clip, offload."""
import pytest
import torch

from conftest import nll

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engine(tiny_model_dir, world_of_one):
    from k2rl.config import JobConfig
    from k2rl.engines.train import TrainEngine

    job = JobConfig(optimizer={"name": "muonclip", "lr": 2e-2, "qk_clip_tau": 0.05}, train={"zero_stage": 0})
    return TrainEngine(tiny_model_dir, job)


def test_muonclip_trains_with_fp32_master_and_clips(engine):
    from k2rl.engines.types import TokenBatch

    assert all(p.dtype == torch.float32 and p.is_cuda for p in engine.model.parameters())
    assert engine.engine.torch_autocast_enabled() and engine.engine.torch_autocast_dtype() == torch.bfloat16
    assert engine.client_optimizer.ns_dtype == torch.float16  # Newton-Schulz on tensor cores, not in fp32
    torch.manual_seed(0)
    batch = TokenBatch.from_lists(torch.randint(20, 4000, (4, 64)).tolist())
    losses, clipped = [], []
    for _ in range(6):
        stats = engine.train_step(batch, nll)
        losses.append(stats["loss"])
        clipped.append(stats["attn/clipped_heads"])
    assert losses[-1] < losses[0] * 0.8, losses
    assert max(clipped) > 0  # tau 0.05 is low on purpose: QK-Clip ran on the fp32 weights
    lp = engine.logprobs(batch)
    assert torch.isfinite(torch.cat(lp)).all()


def test_offload_leaves_the_device_and_reload_restores(engine):
    from k2rl.engines.types import TokenBatch

    batch = TokenBatch.from_lists([[5, 6, 7, 8, 9, 10, 11, 12]])
    before = engine.logprobs(batch)[0]
    held = torch.cuda.memory_allocated()
    param_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    engine.offload()
    left = torch.cuda.memory_allocated()
    assert held - left >= 2 * param_bytes  # at least weights and Muon momentum left the device
    assert left < 1 << 30  # the bound; here a fixed 64 MiB communication bucket stays
    engine.reload()
    torch.testing.assert_close(engine.logprobs(batch)[0], before, rtol=0, atol=0)


def test_reference_computes_like_the_policy(tiny_model_dir, world_of_one):
    """Same weights, same numbers: the reference runs under the policy's bf16 autocast (the KL term
    starts at 0, not at the gap between an fp32 and a bf16 forward)."""
    from k2rl.config import JobConfig
    from k2rl.engines.train import TrainEngine
    from k2rl.engines.types import TokenBatch

    job = JobConfig(optimizer={"name": "muonclip", "lr": 1e-3}, train={"zero_stage": 0},
                    algorithm={"name": "grpo", "kl_coef": 0.1})
    engine = TrainEngine(tiny_model_dir, job, reference_dir=tiny_model_dir)
    batch = TokenBatch.from_lists(torch.randint(20, 4000, (4, 64), generator=torch.Generator().manual_seed(1)).tolist())
    torch.testing.assert_close(torch.cat(engine.reference_logprobs(batch)), torch.cat(engine.logprobs(batch)),
                               rtol=0, atol=0)
