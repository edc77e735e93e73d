"""One episode as a token-level state machine: ids in (a generation), ids out (the observations).

The loop and the oracle both drive episodes through `react` (parse the turn, step the environment:
may be slow, runs in a worker thread) and `apply` (append ids and messages: main thread), so model
rollouts and oracle demonstrations go through the same code and produce the same kind of trajectory.
"""
from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass

from k2rl.config import EnvConfig
from k2rl.engines.types import Generation
from k2rl.env.environment import CheckResult, Environment, StepResult
from k2rl.env.task import Task
from k2rl.model.chat import ChatTokenizer
from k2rl.model.template import ParsedTurn
from k2rl.rollout.trajectory import EpisodeStats, Trajectory


@dataclass
class Limits:
    """Per-episode limits; a task's own `max_turns` / `token_budget` take precedence."""

    max_turns: int = 8
    token_budget: int = 1024  # generated tokens over the whole episode (K2 budget control)
    max_new_tokens: int = 256  # per turn
    max_context: int = 2048  # the whole trajectory: the engine's max_model_len
    step_timeout_s: float = 30.0  # one environment step (all its tool calls, the user's reply) or check

    @classmethod
    def from_config(cls, env: EnvConfig, max_new_tokens: int, max_context: int) -> Limits:
        return cls(max_turns=env.max_turns, token_budget=env.token_budget, max_new_tokens=max_new_tokens,
                   max_context=max_context, step_timeout_s=env.step_timeout_s)


class Episode:
    def __init__(self, env: Environment, task: Task, chat: ChatTokenizer, limits: Limits, sample: int = 0):
        self.env, self.task, self.chat, self.sample = env, task, chat, sample
        self.max_turns = task.max_turns or limits.max_turns
        self.budget = task.token_budget or limits.token_budget
        self.limits = limits
        self.stats = EpisodeStats()
        self.errors: Counter = Counter()
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.routed_experts = None
        self.messages: list[dict] = []
        self.tools: list[dict] = []
        self.prompt_len = 0
        self.finished = False

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Reset the environment and build the prompt ids; an env that raises fails the episode."""
        try:
            opening = self._timed(self.env.reset, self.task)
            self.tools = self.env.declarations()
        except Exception as err:  # noqa: BLE001 - a broken env fails its episode, not the run
            self.fail(f"reset raised {describe_error(err)}")
            return
        self._append(self.chat.encode_tools(self.tools), mask=0)
        self._observe(opening, generation_prompt=True)
        self.prompt_len = len(self.token_ids)

    def room(self) -> int:
        """Tokens the next generation may use (0: no room left, the episode must end)."""
        return max(0, min(self.limits.max_new_tokens, self.budget - self.stats.generated_tokens,
                          self.limits.max_context - len(self.token_ids)))

    def react(self, gen: Generation) -> tuple[ParsedTurn, StepResult | None]:
        """Parse the generation and step the environment (None when the generation was cut off)."""
        parsed = self.chat.parse_turn(_strip_stop(gen.token_ids, self.chat.stop_ids))
        if gen.finish_reason != "stop":
            return parsed, None
        return parsed, self._timed(self.env.step, parsed)

    def apply(self, gen: Generation, parsed: ParsedTurn, step: StepResult | None) -> None:
        """Append the generated ids and, if the episode goes on, the observation ids."""
        self._append(gen.token_ids, mask=1, logprobs=gen.logprobs)
        if gen.routed_experts is not None:  # covers the whole context so far: the last one wins
            self.routed_experts = gen.routed_experts
        self.stats.turns += 1
        self.stats.generated_tokens += len(gen.token_ids)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.calls:
            message["tool_calls"] = [c.as_message_call() for c in parsed.calls]
        self.messages.append(message)
        if step is None:  # cut off mid-turn
            self.stats.truncated = True
            self.end(self._cut_reason(len(gen.token_ids)))
            return
        self.stats.tool_calls += step.tool_calls
        self.stats.valid_calls += step.valid_calls
        self.errors.update(step.errors)
        if step.done:
            self.end("done")
        elif self.stats.turns >= self.max_turns:
            self._observe(step.observations, generation_prompt=False)
            self.end("max_turns")
        else:
            self._observe(step.observations, generation_prompt=True)

    def advance(self, gen: Generation) -> None:
        """react + apply in this thread (the oracle's path; the loop splits them across threads)."""
        try:
            parsed, step = self.react(gen)
        except Exception as err:  # noqa: BLE001
            self.fail(f"step raised {describe_error(err)}")
            return
        self.apply(gen, parsed, step)

    def end(self, reason: str) -> None:
        self.stats.end_reason = self.stats.end_reason or reason
        self.finished = True

    def fail(self, error: str) -> None:
        self.stats.env_error = error
        self.end("env_error")

    def check(self) -> CheckResult:
        if self.stats.env_error:
            return CheckResult.failed(self.stats.env_error)
        try:
            return self._timed(self.env.check)
        except Exception as err:  # noqa: BLE001
            self.stats.env_error = f"check raised {describe_error(err)}"
            return CheckResult.failed(self.stats.env_error)

    def trajectory(self, result: CheckResult) -> Trajectory:
        self.stats.errors = dict(self.errors)
        return Trajectory(task_id=self.task.id, env=self.env.name, token_ids=self.token_ids, loss_mask=self.loss_mask,
                          logprobs=self.logprobs, prompt_len=self.prompt_len, messages=self.messages, tools=self.tools,
                          result=result, stats=self.stats, rubric=self.task.rubric, sample=self.sample,
                          tags=list(self.task.tags), routed_experts=self.routed_experts)

    # ---- helpers -------------------------------------------------------------------------------
    def _observe(self, messages: list[dict], generation_prompt: bool) -> None:
        for message in messages:
            self.messages.append(message)
            self._append(self.chat.encode_message(message), mask=0)
        if generation_prompt:
            self._append(self.chat.generation_prompt(), mask=0)
        if generation_prompt and self.room() == 0 and not self.finished:
            self.end(self._room_reason())

    def _room_reason(self) -> str:
        if self.budget - self.stats.generated_tokens <= 0:
            return "budget"
        return "context" if self.limits.max_context - len(self.token_ids) <= 0 else "turn_length"

    def _cut_reason(self, cut: int) -> str:
        """Which limit stopped a generation of `cut` tokens (already appended)."""
        if cut >= self.budget - (self.stats.generated_tokens - cut):
            return "budget"
        return "context" if cut >= self.limits.max_context - (len(self.token_ids) - cut) else "turn_length"

    def _append(self, ids: list[int], mask: int, logprobs: list[float] | None = None) -> None:
        self.token_ids += ids
        self.loss_mask += [mask] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.stats.env_time_s += time.perf_counter() - start


def _strip_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def describe_error(err: BaseException) -> str:
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
    return f"{type(err).__name__}: {err}{where}"
