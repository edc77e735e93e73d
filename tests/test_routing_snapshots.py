"""The routing-snapshot patch (k2rl.engines.routing_snapshots) touches only a scheduler built as vLLM
0.26's: on this vLLM (0.32, which gathers routing at a request's end) it must leave the scheduler as
it is, or routing replay on a GPU with this vLLM would break. Its effect on 0.26 is tested on the GPU
(tests/test_worker_gpu.py::test_routing_replay_uses_vllm_experts)."""
import pytest
from vllm.v1.core.sched.scheduler import Scheduler

from k2rl.engines.routing_snapshots import copies_every_step, patch_routing_snapshots


def test_leaves_a_scheduler_without_per_step_copies_alone():
    stock = Scheduler._update_after_schedule
    if copies_every_step(Scheduler):
        pytest.skip("this vLLM's scheduler copies block ids every step (0.26): the GPU test covers the patch")
    assert patch_routing_snapshots() is False
    assert Scheduler._update_after_schedule is stock
