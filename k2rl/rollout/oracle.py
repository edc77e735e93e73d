"""The scripted oracle: replays a task's reference solution through the live environment and user,
as token ids, through the same `Episode` code as model rollouts.

Its trajectories are SFT demonstrations (cold start: loss_mask marks the assistant turns) and the
proof that a domain's tools, simulated user and checker agree (tests: >= 99% solved).
"""
from __future__ import annotations

import json
import random

from k2rl.engines.types import Generation
from k2rl.env.environment import Environment
from k2rl.env.kinds import task_type
from k2rl.env.task import SolutionTurn, Task
from k2rl.model.chat import ChatTokenizer
from k2rl.model.template import GENERATION_PROMPT, render_message
from k2rl.rollout.episode import Episode, Limits
from k2rl.rollout.trajectory import Trajectory


def solution_message(turn: SolutionTurn, first_call_index: int) -> dict:
    """The assistant message for a reference turn; call ids `functions.NAME:IDX` count over the dialog."""
    message = {"role": "assistant", "content": turn.say}
    if turn.calls:
        message["tool_calls"] = [
            {"id": f"functions.{c.name}:{first_call_index + i}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.args, ensure_ascii=False)}}
            for i, c in enumerate(turn.calls)]
    return message


def assistant_ids(chat: ChatTokenizer, message: dict) -> list[int]:
    """The ids a model would generate for this assistant message (after the generation prompt, with the stop id)."""
    return chat.encode(render_message(message)[len(GENERATION_PROMPT):])


TEACHER_DECLINE = SolutionTurn(say="Sorry, I can't help with that here.")


def teacher_declines(task: Task, types: list[str], rate: float) -> bool:
    """Whether an imperfect teacher that declines `rate` of the tasks of `types` declines this one (a
    fixed draw per task id, so a task file's dialogs are the same in every run)."""
    return task_type(task.tags) in types and random.Random(f"{task.id}:teacher").random() < rate


def oracle_trajectory(env: Environment, task: Task, chat: ChatTokenizer, limits: Limits = Limits(),
                      decline: bool = False) -> Trajectory:
    """Play `task.solution` in `env` (or, with `decline`, the teacher's one-turn decline); the
    trajectory's check says whether the dialog solved the task."""
    if task.solution is None:
        raise ValueError(f"task {task.id} has no reference solution")
    episode = Episode(env, task, chat, limits)
    episode.start()
    calls_made = 0
    for turn in [TEACHER_DECLINE] if decline else task.solution:
        if episode.finished:
            break
        ids = assistant_ids(chat, solution_message(turn, calls_made))
        episode.advance(Generation(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop"))
        calls_made += len(turn.calls)
    episode.end("oracle_exhausted")
    return episode.trajectory(episode.check())
