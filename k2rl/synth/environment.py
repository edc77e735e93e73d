"""The environment that serves the synthesized RL task pool: each task brings its agent's system
prompt and tools, the tools are answered by the LLM tool simulator (persistent state, controlled
failures) and the user is the LLM user simulator playing the task's persona. The pipeline records
its trajectories through this same class, so SFT data and RL episodes see identical behaviour."""
from __future__ import annotations

import os
import random
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from k2rl.env.environment import Environment
from k2rl.env.task import Task
from k2rl.env.tool import Tool
from k2rl.env.user import LLMUser, User
from k2rl.llm import LLMClient, LLMFailure
from k2rl.synth.arguments import args_model
from k2rl.synth.config import FailureRates
from k2rl.synth.schemas import ToolSpec
from k2rl.synth.toolsim import SimulatedError, ToolSimulator

POOL_ENV = "K2RL_SYNTH_POOL"  # the pool file `tasks()` reads when no class attribute names one
URL_ENV = "K2RL_SYNTH_URL"  # the simulators' endpoint when the constructor gets none


class PoolEntry(BaseModel):
    """One RL task with everything the environment needs to serve it."""

    task: Task
    agent_id: str = ""
    system_prompt: str
    tools: list[ToolSpec]


def load_pool(path: str | Path) -> dict[str, PoolEntry]:
    """Task id -> entry of a pool file (re-read only when the file changes)."""
    stat = Path(path).stat()
    return _load_pool(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _load_pool(path: str, mtime_ns: int, size: int) -> dict[str, PoolEntry]:
    lines = Path(path).read_text().splitlines()
    return {e.task.id: e for e in (PoolEntry.model_validate_json(line) for line in lines if line.strip())}


class LimitedUser:
    """A user that stops answering after `max_replies` replies (ends the dialog)."""

    def __init__(self, user: User, max_replies: int):
        self.user, self.max_replies = user, max_replies

    def reset(self, task: Task) -> str:
        self.replies = 0
        return self.user.reset(task)

    def reply(self, assistant_text: str) -> str | None:
        self.replies += 1
        return self.user.reply(assistant_text) if self.replies <= self.max_replies else None


class SyntheticEnv(Environment):
    name = "synthetic"
    pool_file: ClassVar[str | None] = None

    def __init__(self, *, pool: str | Path | dict[str, PoolEntry] | None = None, base_url: str | None = None, model: str | None = None,
                 simulator: ToolSimulator | None = None, user: User | None = None, failures: dict | None = None,
                 max_user_turns: int = 3, tool_timeout_s: float = 120.0, seed: int = 0):
        if simulator is None or user is None:
            client = LLMClient(base_url or os.environ[URL_ENV], model)
            simulator = simulator or ToolSimulator(client, FailureRates(**(failures or {})))
            user = user or LLMUser(client)
        super().__init__(tool_timeout_s=tool_timeout_s, user=LimitedUser(user, max_user_turns))
        self.pool_path, self.simulator, self.seed = pool, simulator, seed

    @classmethod
    def _pool(cls, pool: str | Path | dict[str, PoolEntry] | None = None) -> dict[str, PoolEntry]:
        if isinstance(pool, dict):
            return pool
        path = pool or cls.pool_file or os.environ.get(POOL_ENV)
        if not path:
            raise ValueError(f"synthetic env: no task pool; pass pool=..., or set {POOL_ENV} to a task_pool.jsonl "
                             f"written by `k2rl synth`")
        return load_pool(path)

    @classmethod
    def tasks(cls, count: int, seed: int = 0) -> list[Task]:
        tasks = [e.task for e in cls._pool().values()]
        random.Random(seed).shuffle(tasks)
        return tasks[:count]

    def declarations(self) -> list[dict]:
        return [t.declaration() for t in self.tools.values()]

    def reset(self, task: Task) -> list[dict]:
        entry = self._pool(self.pool_path)[task.id]
        self.system_prompt = entry.system_prompt
        self.tools = {s.name: Tool(s.name, s.description, args_model(s), self._simulated(s)) for s in entry.tools}
        self.injected: Counter = Counter()
        self.sim_failures: list[LLMFailure] = []
        self.call_index = 0
        return super().reset(task)

    def _simulated(self, spec: ToolSpec):
        def run(env: SyntheticEnv, **arguments: Any) -> str:
            key = f"{env.seed}:{env.task.id}:{env.call_index}:{spec.name}"
            env.call_index += 1
            try:
                outcome = env.simulator.call(spec, {k: v for k, v in arguments.items() if v is not None}, env.state, key)
            except LLMFailure as err:
                env.sim_failures.append(err)
                raise
            except SimulatedError:
                env.injected["error"] += 1
                raise
            env.injected[outcome.mode] += 1
            return outcome.output

        return run
