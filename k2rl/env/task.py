"""A task: what the user wants, the world it starts in, and how to tell whether it was done.

Success is end-state based (ACEBench "end state"): every `expect` path holds in the final state (and
with `unchanged`, nothing changed at all: the right answer was to refuse). Milestones give partial
credit (ACEBench "process"): required calls, words the final reply must contain, or a question the
assistant must ask. A task tagged "refuse" is a refuse task, any other an action task (`kind`).
Tasks come from generators (built-in domains) or from a task file in JSONL or YAML.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from k2rl.env.kinds import Kind, task_kind
from k2rl.validation import ValidationFailed, load_yaml, validate


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Milestone(Strict):
    """A required call (`tool` with an `args` subset), a final-reply check (`say`: any of these words)
    or a question put to the user (`ask`: some assistant message with a "?" and any of these words,
    e.g. asking to confirm: a user's "no" only counts when the assistant asked)."""

    tool: str | None = None
    args: dict[str, Any] = {}
    say: list[str] | None = None
    ask: list[str] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if sum(x is not None for x in (self.tool, self.say, self.ask)) != 1:
            raise ValueError("a milestone has exactly one of `tool` (with optional `args`), `say` or `ask`")
        return self

    @property
    def label(self) -> str:
        if self.say is not None:
            return "say:" + "|".join(self.say)
        if self.ask is not None:
            return "ask:" + "|".join(self.ask)
        return f"{self.tool}({json.dumps(self.args, sort_keys=True)})" if self.args else f"{self.tool}()"


class SolutionCall(Strict):
    name: str
    args: dict[str, Any] = {}


class SolutionTurn(Strict):
    """One reference assistant turn: text, tool calls, or both."""

    say: str = ""
    calls: list[SolutionCall] = []


class Task(Strict):
    id: str
    tags: list[str] = Field([], description="free labels, e.g. the scenario kind; eval reports success per tag. "
                                            "Tag \"refuse\" marks a task whose right answer is to decline (a refuse "
                                            "task); any other task is an action task (k2rl.env.kinds)")
    goal: str = Field(description="what the user wants; the simulated user's opening message unless `message` is set")
    message: str | None = None
    persona: str = ""
    user_info: dict[str, str] = Field({}, description="facts the user gives when asked, by phrase (e.g. 'order id')")
    user_confirms: bool = True
    initial_state: dict[str, Any] = {}
    expect: dict[str, Any] = Field({}, description="dotted path in the end state -> required value")
    unchanged: bool = False
    milestones: list[Milestone] = []
    rubric: str | dict[str, Any] | None = None
    token_budget: int | None = Field(None, gt=0)
    max_turns: int | None = Field(None, ge=1)
    solution: list[SolutionTurn] | None = None

    @property
    def kind(self) -> Kind:
        return task_kind(self.tags)

    @property
    def opening(self) -> str:
        return self.message or self.goal


class _TaskFile(Strict):
    tasks: list[Task]


def load_tasks(path: str | Path) -> list[Task]:
    """Tasks from a `.jsonl` (one task per line) or `.yaml`/`.yml` (a list, or `tasks:` list) file.
    Errors name the file and line; task ids must be unique."""
    path = Path(path)
    if path.suffix == ".jsonl":
        if not path.exists():
            raise ValidationFailed(f"{path}: file not found")
        tasks = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValidationFailed(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
                tasks.append(validate(Task, data, f"{path}:{lineno}"))
    elif path.suffix in (".yaml", ".yml"):
        data, lines = load_yaml(path)
        if isinstance(data, list):
            data, lines = {"tasks": data}, {("tasks",) + k: v for k, v in lines.items()}
        tasks = validate(_TaskFile, data, str(path), lines).tasks
    else:
        raise ValidationFailed(f"{path}: task files are .jsonl, .yaml or .yml")
    seen = set()
    for task in tasks:
        if task.id in seen:
            raise ValidationFailed(f"{path}: duplicate task id {task.id!r}")
        seen.add(task.id)
    return tasks


def sample_tasks(tasks: list[Task], count: int, seed: int) -> list[Task]:
    """`count` of `tasks` (all of them if fewer), in an order fixed by `seed`."""
    tasks = list(tasks)
    random.Random(seed).shuffle(tasks)
    return tasks[:count]
