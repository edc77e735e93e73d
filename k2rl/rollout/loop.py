"""The batched multi-turn agent loop.

Each turn every active episode's ids go to the policy in one `generate` call; then the environments
step concurrently in a thread pool, each within `limits.step_timeout_s`; repeat until every episode
is done, hit its turn limit or ran out of token budget or context.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import replace

from k2rl.engines.types import SamplingConfig
from k2rl.env.environment import CheckResult, Environment
from k2rl.env.task import Task
from k2rl.model.chat import ChatTokenizer
from k2rl.rollout.episode import Episode, Limits, describe_error
from k2rl.rollout.policy import Policy
from k2rl.rollout.trajectory import Trajectory


def run_episodes(policy: Policy, chat: ChatTokenizer, make_env: Callable[[], Environment], tasks: list[Task], *,
                 sampling: SamplingConfig = SamplingConfig(), limits: Limits = Limits(), samples_per_task: int = 1,
                 workers: int = 16, on_done: Callable[[Trajectory], None] | None = None) -> list[Trajectory]:
    """Roll out `samples_per_task` episodes per task; trajectories come back in task order, samples
    of one task next to each other. `make_env()` builds a fresh environment per episode.
    `sampling.max_tokens` is replaced by each episode's room; its stop ids default to the chat's.
    `sampling.seed` applies to every request alike: leave it None when sampling several per task."""
    episodes = [Episode(make_env(), task, chat, limits, sample=k) for task in tasks for k in range(samples_per_task)]
    sampling = replace(sampling, n=1, stop_token_ids=list(sampling.stop_token_ids) or chat.stop_ids)
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(episodes))), thread_name_prefix="k2rl-env")
    results: dict[int, Trajectory] = {}

    def settle(batch: list[tuple[int, Episode]]) -> None:
        """Check newly finished episodes (concurrently, each within the step time limit)."""
        finished = [(i, e, pool.submit(e.check)) for i, e in batch if e.finished and i not in results]
        deadline = time.monotonic() + limits.step_timeout_s
        for i, episode, future in finished:
            try:
                result = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                episode.stats.env_error = f"check exceeded {limits.step_timeout_s:g}s"
                result = CheckResult.failed(episode.stats.env_error)
            results[i] = episode.trajectory(result)
            if on_done:
                on_done(results[i])

    try:
        indexed = list(enumerate(episodes))
        _start_all(pool, episodes, limits.step_timeout_s)
        settle(indexed)
        while active := [(i, e) for i, e in indexed if not e.finished]:
            gens = policy.generate([e.token_ids for _, e in active],
                                   replace(sampling, max_tokens=[e.room() for _, e in active]))
            futures = [pool.submit(e.react, g[0]) for (_, e), g in zip(active, gens)]
            deadline = time.monotonic() + limits.step_timeout_s
            for (_, episode), gen, future in zip(active, gens, futures):
                try:
                    parsed, step = future.result(timeout=max(0.0, deadline - time.monotonic()))
                except FutureTimeout:
                    episode.fail(f"environment step exceeded {limits.step_timeout_s:g}s")
                    continue
                except Exception as err:  # noqa: BLE001 - a broken env fails its episode, not the run
                    episode.fail(f"step raised {describe_error(err)}")
                    continue
                episode.apply(gen[0], parsed, step)
            settle(active)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [results[i] for i in range(len(episodes))]


def _start_all(pool: ThreadPoolExecutor, episodes: list[Episode], timeout_s: float) -> None:
    """Reset every environment concurrently; one that hangs fails its episode."""
    futures = [pool.submit(e.start) for e in episodes]
    deadline = time.monotonic() + timeout_s
    for future, episode in zip(futures, episodes):
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            episode.fail(f"reset exceeded {timeout_s:g}s")
