"""Colocated workers: one Ray actor per accelerator owns a vLLM `RolloutEngine` and a DeepSpeed
`TrainEngine`, and they take turns on the device under an explicit phase state machine:

    ROLLOUT --to_train()--> SWITCHING --> TRAIN --to_rollout()--> SWITCHING --> ROLLOUT

to_train:   vLLM sleeps (weights and KV cache freed), the trainer reloads its state.
to_rollout: vLLM wakes its weights, the trainer streams its weights into vLLM in buckets (in memory,
            in checkpoint names), the trainer offloads, then vLLM wakes its KV cache (waking the KV cache
            last keeps the peak below trainer + vLLM weights + KV cache).
A call in the wrong phase raises `PhaseError` naming the worker, its phase and the allowed phase.
A switch that fails leaves the worker in SWITCHING, where only `stats` answers.

`WorkerGroup` is the driver's handle: it places N workers in a Ray placement group (one bundle per
accelerator, on one node or several; ranks numbered node by node), makes them one torch.distributed
world (DeepSpeed data parallel; the rendezvous on rank 0's node IP), groups every
`rollout.tensor_parallel_size` consecutive workers into one vLLM engine, fans calls out (prompts split
over engines, batches over workers) and turns a dead worker into `WorkerFailed`, naming the worker,
its node (IP and Ray node id; whether the node itself died) and its phase, as soon as Ray reports the
death. The driver never holds a model. docs/cluster.md has the multi-node launch recipe.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from k2rl.config import JobConfig
from k2rl.engines.rollout import RolloutEngine
from k2rl.engines.train import LossFn, TrainEngine
from k2rl.engines.types import Generation, SamplingConfig, TokenBatch, is_routed_expert
from k2rl.engines.world import free_port

# Environment the actors need before importing vLLM / DeepSpeed (see PLATFORM.md).
# Ray marks a node dead after health_check_failure_threshold (5) missed checks every
# health_check_period_ms (3 s): wait that long before reporting a node as alive.
NODE_DEATH_WAIT_S = 20.0
_ACTOR_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "RAY_USAGE_STATS_ENABLED")


class Phase(str, enum.Enum):
    ROLLOUT = "ROLLOUT"
    SWITCHING = "SWITCHING"
    TRAIN = "TRAIN"


class PhaseError(RuntimeError):
    """An operation called in a phase that does not allow it."""


class WorkerFailed(RuntimeError):
    """A worker died or failed during a call; the message names the worker, call and phase."""


def requires(phase: Phase) -> Callable:
    def decorate(method):
        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            if self.phase is not phase:
                raise PhaseError(f"worker {self.rank}: {method.__name__}() is allowed in phase {phase.value}, "
                                 f"but the worker is in phase {self.phase.value}")
            return method(self, *args, **kwargs)
        return checked
    return decorate


class Worker:
    """Both engines on one accelerator. Plain class: `WorkerGroup` runs it as a Ray actor."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.phase = Phase.SWITCHING  # until setup() has built the engines
        self.train: TrainEngine | None = None
        self.rollout: RolloutEngine | None = None  # none in a train-only run (JobConfig.trains_only)
        self.timings: dict[str, float] = {}
        self.metrics: dict[str, float] = {}

    # ---- set-up ----------------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """This node's IP as Ray knows it (reachable from the other nodes, unlike the hostname, which
        may resolve to a loopback address) and a port free on this node: rank 0 hosts the rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_port("")

    def location(self) -> tuple[int, str, str]:
        """(pid, node IP, Ray node id): what a failure report names."""
        import ray

        return os.getpid(), ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def setup(self, model_dir: str, job: dict, master: tuple[str, int], reference_dir: str | None = None) -> None:
        """Build the trainer (joining the DeepSpeed world), offload it, then vLLM: start in ROLLOUT; a
        train-only run builds the trainer alone and starts in TRAIN."""
        self.job = JobConfig.model_validate(job)
        if not (Path(model_dir) / "config.json").exists():
            raise FileNotFoundError(f"worker {self.rank}: model directory {model_dir} is not on this node; on a "
                                    "cluster the run directory must be on a filesystem every node mounts (docs/cluster.md)")
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        with self._timed("time/setup_train"):
            self.train = TrainEngine(model_dir, self.job, reference_dir=reference_dir)
        if self.job.trains_only:
            self.phase = Phase.TRAIN
            return
        self.train.offload()
        with self._timed("time/setup_rollout"):  # the ranks of one engine share its seed
            engine = self.rank // self.job.rollout.tensor_parallel_size
            self.rollout = RolloutEngine.from_config(model_dir, self.job.rollout, self.job.model,
                                                     self.job.run.seed + engine)
        self.phase = Phase.ROLLOUT

    # ---- rollout phase ---------------------------------------------------------------------------
    @requires(Phase.ROLLOUT)
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        with self._timed("time/rollout"):
            return self.rollout.generate(prompts, sampling)

    # ---- switches --------------------------------------------------------------------------------
    @requires(Phase.ROLLOUT)
    def to_train(self) -> None:
        self.phase = Phase.SWITCHING
        with self._timed("time/sleep"):
            self.rollout.sleep()
        with self._timed("time/reload"):
            self.train.reload()
        self.phase = Phase.TRAIN

    @requires(Phase.TRAIN)
    def to_rollout(self) -> None:
        if self.rollout is None:
            raise PhaseError(f"worker {self.rank}: this run started no rollout engine (SFT without held-out "
                             "evaluation); set schedule.eval_every and env.eval_tasks to evaluate")
        self.phase = Phase.SWITCHING
        self.train.release_cached_memory()
        with self._timed("time/wake"):
            self.rollout.wake(("weights",))
        self.sync_weights()
        with self._timed("time/offload"):
            self.train.offload()
        with self._timed("time/wake"):
            self.rollout.wake(("kv_cache",))
        self.phase = Phase.ROLLOUT

    def sync_weights(self) -> None:
        moved, seconds = sync_weights(self.train, self.rollout, self.job.rollout.weight_bucket_bytes)
        self.timings["time/sync"] = self.timings.get("time/sync", 0.0) + seconds
        self.metrics.update({"sync/bytes": moved, "sync/gb_per_s": moved / seconds / 1e9})

    # ---- train phase -----------------------------------------------------------------------------
    @requires(Phase.TRAIN)
    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        with self._timed("time/train"):
            return self.train.train_step(batch, loss_fn)

    @requires(Phase.TRAIN)
    def logprobs(self, batch: TokenBatch) -> list[torch.Tensor]:
        """Trainer logprobs; with `rollout_logprobs` in batch.token_data also the vLLM-trainer gap
        (over the sampled sequences' generated tokens)."""
        with self._timed("time/logprobs"):
            out = self.train.logprobs(batch)
        if "rollout_logprobs" in batch.token_data and len(batch):
            # Sequences flagged `ptx` (curated data mixed in, never sampled by vLLM) have no rollout logprobs.
            sampled = ~batch.seq_data.get("ptx", torch.zeros(len(batch))).bool()
            mask = torch.cat([m & bool(keep) for m, keep in zip(batch.loss_mask, sampled)])
            gap = (torch.cat(out) - torch.cat(batch.token_data["rollout_logprobs"]))[mask].abs()
            if gap.numel():
                self.metrics.update({"mismatch/logprob_abs": float(gap.mean()), "mismatch/logprob_abs_max": float(gap.max())})
        return out

    @requires(Phase.TRAIN)
    def reference_logprobs(self, batch: TokenBatch) -> list[torch.Tensor]:
        with self._timed("time/reference"):
            return self.train.reference_logprobs(batch)

    @requires(Phase.TRAIN)
    def save_checkpoint(self, out_dir: str, training_state: bool = True) -> None:
        with self._timed("time/save"):
            self.train.save_checkpoint(out_dir, training_state)

    @requires(Phase.TRAIN)
    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Trainer state from a checkpoint; vLLM gets the weights at the next to_rollout()."""
        self.train.load_checkpoint(ckpt_dir)

    # ---- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Timings and metrics since the last call, the phase and what each engine holds on the device."""
        out = {**self.timings, **self.metrics, "phase": self.phase.value}
        if self.rollout is not None:
            out.update({f"memory/rollout_{k}": v for k, v in self.rollout.holds_device_memory().items()})
        if self.train is not None:
            out["memory/train"] = self.train.holds_device_memory()
        self.timings, self.metrics = {}, {}
        return out

    def _timed(self, key: str):
        worker = self

        class Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                worker.timings[key] = worker.timings.get(key, 0.0) + time.perf_counter() - self.start

        return Timer()


def sync_weights(train: TrainEngine, rollout: RolloutEngine, bucket_bytes: int) -> tuple[int, float]:
    """Stream the trainer's weights into vLLM (buckets from the trainer, cast to vLLM's dtype on the
    way out, one in-place reload in vLLM); where vLLM can take them directly, the routed experts follow
    as straight copies from the trainer's fused stacks, each engine rank its own block, cast on the way
    (k2rl.engines.expert_copy). Returns (bytes written into vLLM, seconds)."""
    moved = 0

    def stream(select=None):
        nonlocal moved
        for bucket in train.export_weights(bucket_bytes, rollout.dtype, select):
            for name, tensor in bucket:
                moved += tensor.numel() * tensor.element_size()
                yield name, tensor

    start = time.perf_counter()
    if rollout.direct_experts:
        rollout.load_weights(stream(lambda name: not is_routed_expert(name)))
        moved += rollout.load_experts(train.expert_stacks())
    else:
        rollout.load_weights(stream())
    return moved, time.perf_counter() - start


class WorkerGroup:
    """N colocated workers as Ray actors in one placement group; the loop's single handle on them."""

    def __init__(self, model_dir: str | Path, job: JobConfig, reference_dir: str | Path | None = None):
        """`reference_dir`: a frozen reference policy each trainer holds for the KL term."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(address=job.workers.ray_address, log_to_driver=False)
        w = job.workers
        self.num_workers, self.timeout = w.num_workers, w.call_timeout_s
        self.tp = job.rollout.tensor_parallel_size
        bundle = {"CPU": w.cpus_per_worker, **({"GPU": w.gpus_per_worker} if w.gpus_per_worker else {})}
        self.pg = placement_group([bundle] * w.num_workers, strategy=w.placement)
        try:
            ray.get(self.pg.ready(), timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise WorkerFailed(f"Ray could not place {w.num_workers} workers of {bundle} ({w.placement}) within "
                               f"{self.timeout:.0f}s; the cluster has {ray.cluster_resources()}") from None
        env = {k: os.environ[k] for k in _ACTOR_ENV if k in os.environ}
        actor = ray.remote(Worker)
        self.actors = [
            actor.options(num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_worker, max_restarts=0,
                          runtime_env={"env_vars": env},
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=b))
            .remote(rank, w.num_workers)
            for rank, b in enumerate(_bundles_by_node(self.pg))]
        self.phase = [Phase.SWITCHING] * w.num_workers
        self.pids = self.node_ips = self.node_ids = ["?"] * w.num_workers  # until the workers report
        self.pids, self.node_ips, self.node_ids = map(list, zip(*self._call("location")))
        self.master = self._call_one(0, "address")
        self._call("setup", str(model_dir), job.model_dump(mode="json"), self.master,
                   str(reference_dir) if reference_dir is not None else None)
        self.phase = [Phase.TRAIN if job.trains_only else Phase.ROLLOUT] * w.num_workers

    # ---- fan-out ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """Prompts split into contiguous chunks, one per engine; every rank of an engine gets its chunk
        (tensor-parallel ranks step together) and the first rank's results are kept; in prompt order."""
        chunks = [c for c in _chunks(len(prompts), self.num_workers // self.tp) for _ in range(self.tp)]
        budgets, seeds = zip(*sampling.per_prompt(len(prompts))) if prompts else ((), ())
        per_worker = [(prompts[lo:hi], dataclasses.replace(sampling, max_tokens=list(budgets[lo:hi]), seed=list(seeds[lo:hi])))
                      for lo, hi in chunks]
        results = self._call_each("generate", per_worker, skip_empty=[hi == lo for lo, hi in chunks])
        return [g for part in results[::self.tp] for g in part]

    def to_train(self) -> None:
        """Sleep vLLM, reload the trainer; a no-op when already there, so callers switch only when the
        next call needs the other engine (SFT steps back to back never wake vLLM)."""
        if set(self.phase) != {Phase.TRAIN}:
            self._call("to_train", next_phase=Phase.TRAIN)

    def to_rollout(self) -> None:
        """Wake vLLM with the trainer's latest weights, offload the trainer; a no-op when already there."""
        if set(self.phase) != {Phase.ROLLOUT}:
            self._call("to_rollout", next_phase=Phase.ROLLOUT)

    def train_step(self, batch: TokenBatch, loss_fn: LossFn) -> dict[str, float]:
        """Sequences dealt round-robin to the workers; stats come back already averaged over ranks."""
        return self._call_each("train_step", [(batch.shard(i, self.num_workers), loss_fn) for i in range(self.num_workers)])[0]

    def logprobs(self, batch: TokenBatch) -> list[torch.Tensor]:
        return self._sharded("logprobs", batch)

    def reference_logprobs(self, batch: TokenBatch) -> list[torch.Tensor]:
        return self._sharded("reference_logprobs", batch)

    def _sharded(self, method: str, batch: TokenBatch) -> list[torch.Tensor]:
        """Per-sequence results of `method` with sequences dealt round-robin, back in batch order."""
        parts = self._call_each(method, [(batch.shard(i, self.num_workers),) for i in range(self.num_workers)])
        out: list[torch.Tensor] = [None] * len(batch)
        for i, part in enumerate(parts):
            out[i::self.num_workers] = part
        return out

    def save_checkpoint(self, out_dir, training_state: bool = True) -> None:
        self._call("save_checkpoint", str(out_dir), training_state)

    def load_checkpoint(self, ckpt_dir) -> None:
        self._call("load_checkpoint", str(ckpt_dir))

    def stats(self) -> dict:
        """Per key the max over workers (the slowest worker sets the step time); phases listed."""
        per_worker = self._call("stats")
        merged = {}
        for s in per_worker:
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    merged[k] = max(merged.get(k, v), v)
        merged["phases"] = [s["phase"] for s in per_worker]
        return merged

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)

    # ---- calls and failures ----------------------------------------------------------------------
    def _call(self, method: str, *args, next_phase: Phase | None = None):
        return self._call_each(method, [args] * self.num_workers, next_phase=next_phase)

    def _call_one(self, index: int, method: str, *args):
        return self._wait({getattr(self.actors[index], method).remote(*args): index}, method)[index]

    def _call_each(self, method: str, args_per_worker: list[tuple], next_phase: Phase | None = None,
                   skip_empty: list[bool] | None = None) -> list:
        if next_phase is not None:
            self.phase = [Phase.SWITCHING] * self.num_workers
        refs = {getattr(a, method).remote(*args): i
                for i, (a, args) in enumerate(zip(self.actors, args_per_worker)) if not (skip_empty and skip_empty[i])}
        done = self._wait(refs, method)
        if next_phase is not None:
            self.phase = [next_phase] * self.num_workers
        return [done.get(i, []) for i in range(self.num_workers)]

    def _wait(self, refs: dict, method: str) -> dict[int, object]:
        """Results by worker index; the first failure (a death included) raises at once, not at the end."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        results, pending, deadline = {}, list(refs), time.monotonic() + self.timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                slow = sorted(refs[r] for r in pending)
                raise WorkerFailed(f"workers {slow} ({', '.join(self._where(i) for i in slow)}) did not finish "
                                   f"{method}() within {self.timeout:.0f}s (phase {self.phase[slow[0]].value})")
            i = refs[ready[0]]
            try:
                results[i] = ray.get(ready[0])
            except (ActorDiedError, ActorUnavailableError, RayActorError) as e:
                # An unreachable actor may be on a lost node: give Ray's health check time to say so.
                wait = NODE_DEATH_WAIT_S if isinstance(e, ActorUnavailableError) else 0.0
                raise WorkerFailed(f"worker {i} ({self._where(i)}) died during {method}() in phase "
                                   f"{self.phase[i].value}: {type(e).__name__}{self._node_death(i, wait)}") from e
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, PhaseError):
                    raise e.cause from None
                raise WorkerFailed(f"worker {i} failed in {method}() (phase {self.phase[i].value}): {e.cause!r}") from e
        return results


    def _where(self, i: int) -> str:
        return f"pid {self.pids[i]} on node {self.node_ips[i]} id {self.node_ids[i]}"

    def _node_death(self, i: int, wait_s: float) -> str:
        """'; its node ... is dead' once Ray marks worker i's node dead (a lost machine, not just a
        process) within `wait_s`; else nothing."""
        import ray

        deadline = time.monotonic() + wait_s
        while True:
            if any(n["NodeID"] == self.node_ids[i] and not n["Alive"] for n in ray.nodes()):
                return f"; its node {self.node_ips[i]} id {self.node_ids[i]} is dead"
            if time.monotonic() >= deadline:
                return ""
            time.sleep(0.5)


def _bundles_by_node(pg) -> list[int]:
    """Bundle indices ordered node by node (nodes in order of first appearance), so that consecutive
    ranks, and hence every tensor-parallel engine, share a node whenever the placement allows."""
    from ray.util.placement_group import placement_group_table

    node_of = placement_group_table(pg)["bundles_to_node_id"]
    first = {}
    for b in sorted(node_of):
        first.setdefault(node_of[b], b)
    return sorted(node_of, key=lambda b: (first[node_of[b]], b))


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of sizes differing by at most one."""
    bounds = [round(n * k / parts) for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
