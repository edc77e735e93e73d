"""Baseline policies that need no model, played through the real agent loop and environments:
`refuse` (declines every turn), `nothing` (a friendly reply, never a tool call) and `oracle` (the
scripted reference solution).

They bound what a score means: a model that does not beat `refuse` and `nothing` on the same tasks
has learned a shortcut, not tool use (`refuse` passes every refuse task and nothing else).
"""
from __future__ import annotations

from collections.abc import Callable

from k2rl.engines.types import Generation, SamplingConfig
from k2rl.env.environment import Environment
from k2rl.env.task import Task
from k2rl.model.chat import ChatTokenizer
from k2rl.rollout.episode import Limits
from k2rl.rollout.loop import run_episodes
from k2rl.rollout.oracle import assistant_ids, oracle_trajectory
from k2rl.rollout.trajectory import Trajectory

SCRIPTS = {"refuse": "Sorry, I cannot do that.", "nothing": "Hello."}
BASELINES = (*SCRIPTS, "oracle")


class ScriptedPolicy:
    """Generates the same assistant text for every prompt (cut to the prompt's token budget)."""

    def __init__(self, chat: ChatTokenizer, text: str):
        self.ids = assistant_ids(chat, {"role": "assistant", "content": text})

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        out = []
        for max_tokens, _ in sampling.per_prompt(len(prompts)):
            ids = self.ids[:max_tokens]
            out.append([Generation(token_ids=ids, logprobs=[0.0] * len(ids),
                                   finish_reason="stop" if len(ids) == len(self.ids) else "length")])
        return out


def run_baseline(name: str, chat: ChatTokenizer, make_env: Callable[[], Environment], tasks: list[Task],
                 limits: Limits = Limits(), declines: Callable[[Task], bool] | None = None) -> list[Trajectory]:
    """One episode per task under baseline `name` (one of BASELINES); `declines` makes the oracle an
    imperfect teacher that declines the tasks it picks (algorithm.teacher_declines)."""
    if name == "oracle":
        return [oracle_trajectory(make_env(), task, chat, limits, bool(declines and declines(task))) for task in tasks]
    if name not in SCRIPTS:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return run_episodes(ScriptedPolicy(chat, SCRIPTS[name]), chat, make_env, tasks, limits=limits)


def baselines_for(tasks: list[Task]) -> list[str]:
    """The baselines that can play these tasks: the oracle needs every task's reference solution."""
    return [name for name in BASELINES if name != "oracle" or all(task.solution is not None for task in tasks)]
