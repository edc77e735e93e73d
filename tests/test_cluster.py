"""WorkerGroup across two Ray nodes (ray.cluster_utils.Cluster on one machine, one CPU per node, so
the placement puts one worker on each): the rendezvous on rank 0's node IP, a generate -> train step
-> sync round trip across the nodes, and a node removed mid-step reported by name."""
import sys
import threading

import pytest

from k2rl.config import JobConfig
from k2rl.engines.types import completion_batch
from k2rl.worker import WorkerFailed, WorkerGroup
from test_worker import GREEDY, PROMPTS, nll_loss


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    cloudpickle.register_pickle_by_value(sys.modules["test_worker"])  # actors cannot import the test modules
    # Health checks every 0.5 s: the removed node is marked dead within ~2 s instead of ~15 s.
    checks = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": checks})
    worker_node = c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    yield c, worker_node
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def group(cluster, tiny_model_dir):
    job = JobConfig(optimizer={"name": "adamw", "lr": 2e-3}, train={"zero_stage": 1},
                    rollout={"max_model_len": 512, "weight_bucket_bytes": 256 << 10},
                    workers={"num_workers": 2, "cpus_per_worker": 1, "call_timeout_s": 300, "placement": "STRICT_SPREAD"})
    g = WorkerGroup(tiny_model_dir, job)
    yield g
    g.shutdown()


def test_one_worker_per_node_rendezvous_on_rank0_node(cluster, group):
    _, worker_node = cluster
    assert len(set(group.node_ids)) == 2 and worker_node.node_id in group.node_ids
    assert group.master[0] == group.node_ips[0]  # the IP Ray reaches rank 0's node by, not a hostname lookup


def test_round_trip_across_nodes(group):
    before = group.generate(PROMPTS * 2, GREEDY)  # each node's worker decodes both prompts
    group.to_train()
    stats = group.train_step(completion_batch(PROMPTS * 2, before), nll_loss)
    assert stats["grad_norm"] > 0
    group.to_rollout()
    assert group.stats()["sync/bytes"] > 0
    decodes = [g[0].token_ids for g in group.generate(PROMPTS * 2, GREEDY)]
    assert decodes[:2] == decodes[2:]  # the same updated weights reached both nodes' vLLMs
    assert decodes != [g[0].token_ids for g in before]


def test_removed_node_is_named(cluster, group):
    c, worker_node = cluster
    lost = group.node_ids.index(worker_node.node_id)
    threading.Timer(1.0, c.remove_node, args=(worker_node,), kwargs={"allow_graceful": False}).start()
    with pytest.raises(WorkerFailed) as failure:
        for _ in range(100):  # the node goes while one of these calls runs
            group.generate(PROMPTS * 8, GREEDY)
    message = str(failure.value)
    assert f"worker {lost} (pid {group.pids[lost]} on node {group.node_ips[lost]} id {worker_node.node_id}) died" in message
    assert f"its node {group.node_ips[lost]} id {worker_node.node_id} is dead" in message
