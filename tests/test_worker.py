"""Two colocated workers on real Ray + DeepSpeed (ZeRO 1 and 3) + vLLM, CPU: a full RL step, phase
rules, and a killed worker surfacing as a named error."""
import os
import signal
import sys
import time

import pytest
import torch

from k2rl.config import JobConfig
from k2rl.engines.types import SamplingConfig, TokenBatch, completion_batch
from k2rl.model.checkpoint import load_model
from k2rl.model.modeling import greedy_decode
from k2rl.worker import PhaseError, WorkerFailed, WorkerGroup

PROMPTS = [[5, 6, 7, 8], [100, 200, 300]]
GREEDY = SamplingConfig(temperature=0, max_tokens=6)


def nll_loss(new_logprobs, batch):
    mask = torch.cat(batch.loss_mask).float()
    return -(torch.cat(new_logprobs) * mask).sum() / mask.sum(), {}


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    ray.init(address="local", num_cpus=4, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module", params=[1, 3], ids=["zero1", "zero3"])
def group(request, ray_session, tiny_model_dir):
    job = JobConfig(optimizer={"name": "adamw", "lr": 2e-3}, train={"zero_stage": request.param},
                    rollout={"max_model_len": 512, "weight_bucket_bytes": 256 << 10},
                    workers={"num_workers": 2, "cpus_per_worker": 1, "call_timeout_s": 300})
    g = WorkerGroup(tiny_model_dir, job)
    yield g
    g.shutdown()


def test_rl_step_then_sync_matches_trainer(group, tmp_path):
    before = group.generate(PROMPTS * 2, GREEDY)  # each worker decodes both prompts
    group.to_train()
    batch = completion_batch(PROMPTS * 2, before)
    group.logprobs(batch)
    assert group.stats()["mismatch/logprob_abs"] < 5e-3
    stats = group.train_step(batch, nll_loss)
    assert stats["grad_norm"] > 0 and stats["loss"] > 0
    group.save_checkpoint(tmp_path / "ckpt")
    group.to_rollout()
    switch = group.stats()
    assert switch["phases"] == ["ROLLOUT", "ROLLOUT"]
    assert switch["time/sync"] > 0 and switch["sync/bytes"] > 0 and "time/offload" in switch

    after = group.generate(PROMPTS * 2, GREEDY)
    decodes = [g[0].token_ids for g in after]
    assert decodes[:2] == decodes[2:]  # both workers' vLLMs hold the same weights
    assert decodes != [g[0].token_ids for g in before]  # and they are the updated ones
    model = load_model(tmp_path / "ckpt").eval()
    assert decodes[:2] == [greedy_decode(model, p, len(d)) for p, d in zip(PROMPTS, decodes)]

    group.to_train()
    group.logprobs(completion_batch(PROMPTS * 2, after))
    stats = group.stats()
    assert stats["mismatch/logprob_abs"] < 5e-3 and stats["mismatch/logprob_abs_max"] < 3e-2
    group.to_rollout()


def test_wrong_phase_is_refused_with_names(group):
    with pytest.raises(PhaseError, match=r"worker \d: train_step\(\) is allowed in phase TRAIN, but the worker is in phase ROLLOUT"):
        group.train_step(TokenBatch.from_lists([[1, 2, 3]] * 2), nll_loss)
    group.to_train()
    with pytest.raises(PhaseError, match="generate.*ROLLOUT.*TRAIN"):
        group.generate(PROMPTS, GREEDY)
    group.to_rollout()


def test_killed_worker_is_named_within_seconds(group, request):
    if "zero3" not in request.node.callspec.id:
        pytest.skip("one kill is enough; it ends the group")
    os.kill(group.pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"worker 1 \(pid \d+ on node [\d.]+ id \w+\) died during generate\(\) in phase ROLLOUT"):
        group.generate(PROMPTS * 2, GREEDY)
    assert time.monotonic() - start < 10
