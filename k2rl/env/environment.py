"""The environment API: tools over a state, a simulated user, and an end-state check.

Subclass `Environment`, mark methods with `@tool`, set `system_prompt` and point `task_file` at your
tasks (or override `tasks`). The default `reset` copies the task's initial state into `self.state`,
the default `check` scores it against the task's `expect` / `unchanged` / `milestones`.

`step` never raises for anything the model did: malformed call text, unknown tools, bad arguments,
tool exceptions and time-outs come back as error observations, counted by kind in `StepResult.errors`.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from k2rl.env.task import Task, load_tasks, sample_tasks
from k2rl.env.tool import Tool, ToolError
from k2rl.env.user import RuleUser, User
from k2rl.model.template import ParsedTurn, ToolCall

ERROR_KINDS = ("malformed", "unknown_tool", "invalid_args", "tool_exception", "tool_timeout")


@dataclass
class StepResult:
    observations: list[dict]  # chat messages: role "tool" (with tool_call_id), "user", or "system" errors
    done: bool
    tool_calls: int = 0
    valid_calls: int = 0  # known tool and valid arguments
    errors: Counter = field(default_factory=Counter)  # kind (ERROR_KINDS) -> count


@dataclass
class CheckResult:
    """Verifiable outcome: `success` (end state right and every milestone met), `score` (share of
    milestones met: partial credit), per-milestone detail, and an error if the env itself failed."""

    success: bool
    score: float
    state_ok: bool = False
    milestones: dict[str, bool] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> CheckResult:
        return cls(success=False, score=0.0, error=error)

    def to_dict(self) -> dict:
        return asdict(self)


class Environment:
    name: ClassVar[str] = ""
    system_prompt: ClassVar[str] = "You are a helpful assistant. Use the tools to do what the user asks."
    task_file: ClassVar[str | None] = None  # relative to the module defining the class
    tools: ClassVar[dict[str, Tool]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name = cls.__dict__.get("name") or cls.__name__.lower()
        members = {k: v for klass in reversed(cls.__mro__) for k, v in vars(klass).items()}  # definition order
        cls.tools = {t.name: t for t in (getattr(m, "__k2rl_tool__", None) for m in members.values()) if t}

    def __init__(self, *, tool_timeout_s: float = 5.0, user: User | None = None):
        self.tool_timeout_s = tool_timeout_s
        self.user = user or RuleUser()

    # ---- tasks ---------------------------------------------------------------------------------
    @classmethod
    def tasks(cls, count: int, seed: int = 0) -> list[Task]:
        """`count` tasks chosen by `seed` (fewer if the task file has fewer)."""
        if cls.task_file is None:
            raise NotImplementedError(f"{cls.__name__}: set `task_file` or override `tasks(count, seed)`")
        return sample_tasks(load_tasks(Path(inspect.getfile(cls)).parent / cls.task_file), count, seed)

    @classmethod
    def declarations(cls) -> list[dict]:
        return [t.declaration() for t in cls.tools.values()]

    # ---- episode -------------------------------------------------------------------------------
    def reset(self, task: Task) -> list[dict]:
        """Start an episode; returns the opening messages (system prompt, the user's first message)."""
        self.task = task
        self.state = self.initial_state(task)
        self.start_state = copy.deepcopy(self.state)
        self.calls: list[tuple[str, dict]] = []  # calls the tools answered (ToolError too), for milestones
        self.replies: list[str] = []  # the assistant's messages to the user, in order
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": self.user.reset(task)}]

    def initial_state(self, task: Task) -> dict:
        return copy.deepcopy(task.initial_state)

    def step(self, turn: ParsedTurn) -> StepResult:
        """Run the turn's calls in order; a turn without calls is a message to the user."""
        result = StepResult([], done=False)
        for error in turn.errors:
            result.errors["malformed"] += 1
            result.observations.append({"role": "system", "content": f"Error: {error}"})
        for call in turn.calls:
            result.tool_calls += 1
            result.observations.append({"role": "tool", "tool_call_id": call.id, "content": self._call(call, result)})
        if not turn.calls and not turn.errors:
            self.replies.append(turn.content)
            answer = self.user.reply(turn.content)
            if answer is None:
                result.done = True
            else:
                result.observations.append({"role": "user", "content": answer})
        return result

    def _call(self, call: ToolCall, result: StepResult) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            result.errors["unknown_tool"] += 1
            return f"Error: unknown tool {call.name!r}; available tools: {', '.join(self.tools)}"
        try:
            kwargs = tool.parse(call.arguments)
        except ValueError as err:
            result.errors["invalid_args"] += 1
            return f"Error: {err}"
        result.valid_calls += 1
        status, outcome = _run_with_timeout(lambda: tool.fn(self, **kwargs), self.tool_timeout_s)
        if status == "timeout":
            result.errors["tool_timeout"] += 1
            return f"Error: {call.name} timed out after {self.tool_timeout_s:g}s"
        if status == "raised" and not isinstance(outcome, ToolError):
            result.errors["tool_exception"] += 1
            return f"Error: {call.name} failed: {type(outcome).__name__}: {outcome}"
        self.calls.append((call.name, kwargs))
        if isinstance(outcome, ToolError):  # an expected failure answers the call: a look-up that finds nothing
            return f"Error: {outcome}"
        return outcome if isinstance(outcome, str) else json.dumps(outcome, ensure_ascii=False, default=str)

    def check(self) -> CheckResult:
        """Score the end state against the task (override for custom checks)."""
        task = self.task
        state_ok = all(_same(lookup(self.state, path), value) for path, value in task.expect.items())
        if task.unchanged:
            state_ok = state_ok and self.state == self.start_state
        milestones = {m.label: self._reached(m) for m in task.milestones}
        score = sum(milestones.values()) / len(milestones) if milestones else float(state_ok)
        return CheckResult(success=state_ok and all(milestones.values()), score=score, state_ok=state_ok,
                           milestones=milestones)

    def _reached(self, milestone) -> bool:
        if milestone.say is not None:
            reply = self.replies[-1].lower() if self.replies else ""
            return any(word.lower() in reply for word in milestone.say)
        if milestone.ask is not None:
            return any("?" in reply and any(word.lower() in reply.lower() for word in milestone.ask)
                       for reply in self.replies)
        return any(name == milestone.tool and all(_same(args.get(k), v) for k, v in milestone.args.items())
                   for name, args in self.calls)


def lookup(state: Any, path: str) -> Any:
    """`state` at a dotted path ("orders.O12.status", list indices as numbers); None if absent, so
    `expect: {"events.E7": null}` means "E7 was deleted"."""
    node = state
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _same(actual: Any, expected: Any) -> bool:
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)) and not isinstance(actual, bool):
        return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-6)
    return actual == expected


def _run_with_timeout(fn, timeout_s: float):
    """fn() in a daemon thread -> ("ok", value) | ("raised", exception) | ("timeout", None). A timed-out
    call keeps running in the background (Python cannot kill threads): tools should not block forever."""
    box = [("timeout", None)]

    def target():
        try:
            box[0] = ("ok", fn())
        except BaseException as err:  # noqa: BLE001 - handed back to the caller as a value
            box[0] = ("raised", err)

    thread = threading.Thread(target=target, daemon=True, name="k2rl-tool")
    thread.start()
    thread.join(timeout_s)
    return ("timeout", None) if thread.is_alive() else box[0]
