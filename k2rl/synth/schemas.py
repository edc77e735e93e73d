"""The records each synthesis stage writes, one JSON object per line, plus the text types that keep
LLM output usable: a grammar backend may ignore `maxLength` and put control characters in strings, so
free text is cleaned and cut (not rejected) and identifiers are normalised."""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
IDENT_PATTERN = r"^[a-z][a-z0-9_]{1,39}$"


def Text(chars: int):  # noqa: N802 (a type factory, used like a type)
    """A string with control characters turned into spaces, cut to `chars`."""
    return Annotated[str, BeforeValidator(lambda v: _CONTROL.sub(" ", str(v)).strip()[:chars]),
                     Field(json_schema_extra={"maxLength": chars})]


def Items(item: Any, most: int, least: int = 0):  # noqa: N802
    """A list of at most `most` items (longer lists are cut: the cap bounds tokens, not meaning)."""
    return Annotated[list[item], BeforeValidator(lambda v: v[:most] if isinstance(v, list) else v),
                     Field(min_length=least, max_length=most)]


def to_ident(value: Any) -> str:
    """snake_case identifier (tool, parameter and state-key names) from whatever the model wrote."""
    slug = re.sub(r"[^a-z0-9]+", "_", str(value).lower()).strip("_")
    if not slug or not slug[0].isalpha():
        slug = "t_" + slug
    return slug[:40].rstrip("_").ljust(2, "x")


Ident = Annotated[str, BeforeValidator(to_ident), Field(pattern=IDENT_PATTERN)]


class Record(BaseModel):
    """A stage output line. `id` is the work item's key: resume skips items whose id is on disk;
    `run` names the process that wrote it (so a test can prove nothing was redone)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    run: str = ""


class ToolSpec(BaseModel):
    """One tool as the agent sees it (OpenAI function shape) plus what the simulator needs to know."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-\.]{0,63}$")
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    effects: str = Field("", description="semantics of state changes; empty for read-only tools")
    domain: str = ""
    application: str = ""
    source: Literal["generated", "mcp", "openai"] = "generated"

    def declaration(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def schema_key(self) -> str:
        """What makes two tools the same beyond their name: description words and argument schema."""
        words = " ".join(re.findall(r"[a-z0-9]+", self.description.lower()))
        return json.dumps([words, self.parameters], sort_keys=True)


class App(BaseModel):
    """An application domain grown from a category description (K2: category -> application -> tools)."""

    id: str
    domain: str
    name: str
    description: str


class AppBatch(Record):
    """The applications proposed for one category (domain description)."""

    apps: list[App]


class ToolBatch(Record):
    """The tools generated for one application."""

    application: str
    tools: list[ToolSpec]


class AgentSpec(Record):
    name: str
    system_prompt: str
    tools: list[str]
    domain: str
    application: str


class TaskSpec(Record):
    """A user goal with its rubric: success criteria (judged) and milestones (expected tool calls)."""

    agent_id: str
    difficulty: str
    goal: str
    persona: str
    required_info: dict[str, str]
    initial_state: dict[str, Any]
    success_criteria: list[str]
    milestones: list[str]


class Trajectory(Record):
    task_id: str
    agent_id: str
    messages: list[dict]  # OpenAI/K2 chat messages; tool call ids are functions.NAME:IDX
    tools: list[dict]  # declarations, as in K2's tool_declare
    end: Literal["user_done", "max_turns"]
    agent_turns: int
    user_turns: int
    tool_calls: int
    injected: dict[str, int]  # controlled failures by mode
    final_state: dict[str, Any]


class Verdict(Record):
    """The rubric judge on one trajectory; `reasons` says why it failed (empty when it passed)."""

    task_id: str
    score: float
    passed: bool
    criteria: dict[str, float]
    reasons: list[str]
