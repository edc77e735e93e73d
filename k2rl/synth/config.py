"""`k2rl synth` configuration: one section per stage, unknown keys rejected with file:line errors.

Relative paths (domain files, spec imports, the output directory) are resolved against the config
file's directory, so a config works from any working directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from k2rl.config import apply_override
from k2rl.validation import ValidationFailed, load_model_file, load_yaml, validate

Difficulty = Literal["single_call", "multi_step", "complex"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMSection(Section):
    """The endpoint that writes tools, agents, tasks and plays user, tool world and judge."""

    base_url: str
    model: str | None = None
    api_key: str = "EMPTY"
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(2, ge=0)
    temperature: float = Field(0.9, ge=0, description="synthesis wants diversity; each item has its own seed")
    cache_dir: str | None = Field("cache", description="response cache (under out_dir when relative); null: off")


class Domain(Section):
    name: str = Field(min_length=1)
    description: str = Field(min_length=1)


class DomainFile(Section):
    domains: list[Domain]


class ToolsSection(Section):
    domains: list[Domain] | str = Field(description="domain descriptions, or a YAML file with `domains:`")
    imports: list[str] = Field([], description="MCP tool JSON or OpenAI function spec files to add")
    apps_per_domain: int = Field(3, ge=1)
    tools_per_app: int = Field(5, ge=1)
    max_params: int = Field(4, ge=0)


class AgentsSection(Section):
    count: int = Field(10, ge=1)
    min_tools: int = Field(2, ge=1)
    max_tools: int = Field(5, ge=1)

    @model_validator(mode="after")
    def _range(self):
        if self.min_tools > self.max_tools:
            raise ValueError(f"min_tools ({self.min_tools}) > max_tools ({self.max_tools})")
        return self


class TasksSection(Section):
    per_agent: int = Field(3, ge=1)
    difficulties: list[Difficulty] = Field(["single_call", "multi_step", "complex"], min_length=1,
                                           description="cycled over each agent's tasks")


class FailureRates(Section):
    """Share of tool calls the simulator answers with each kind of controlled failure."""

    error: float = Field(0.1, ge=0, le=1)
    partial: float = Field(0.1, ge=0, le=1)
    edge_case: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _at_most_one(self):
        if self.error + self.partial + self.edge_case > 1:
            raise ValueError("error + partial + edge_case must be at most 1")
        return self


class AgentBackendSection(Section):
    """The agent being recorded: an OpenAI-compatible endpoint (default: the `llm` one) or an
    in-process vLLM engine on a model directory (K2 native tool-call tokens)."""

    kind: Literal["endpoint", "engine"] = "endpoint"
    base_url: str | None = None
    model: str | None = None
    model_dir: str | None = None
    max_tokens: int = Field(384, gt=0, description="per turn, engine only (an endpoint's is set by the schema)")
    temperature: float = Field(0.7, ge=0)
    max_calls: int = Field(3, ge=1, description="tool calls per turn (endpoint JSON protocol)")

    @model_validator(mode="after")
    def _engine_needs_dir(self):
        if self.kind == "engine" and not self.model_dir:
            raise ValueError("agent.kind 'engine' needs agent.model_dir")
        return self


class TrajectoriesSection(Section):
    samples_per_task: int = Field(1, ge=1)
    max_agent_turns: int = Field(8, ge=1)
    max_user_turns: int = Field(3, ge=0)
    agent: AgentBackendSection = AgentBackendSection()
    failures: FailureRates = FailureRates()
    user_max_tokens: int = Field(128, gt=0)


class FilterSection(Section):
    rubric: str = Field("tool_use", description="rubric name (rubrics/) or path; task criteria are added")
    threshold: float = Field(0.6, ge=0, le=1, description="keep a trajectory whose weighted score reaches this")
    criterion_threshold: float = Field(0.5, ge=0, le=1, description="a criterion below this is a failure reason")
    reason_chars: int = Field(120, ge=8)


class OutputSection(Section):
    tokenizer: str | None = Field(None, description="model dir: add input_ids and loss mask to the SFT set")


class SynthConfig(Section):
    out_dir: str = "runs/synth"
    seed: int = 0
    workers: int = Field(4, ge=1, description="items simulated at once per stage")
    progress: bool = True
    llm: LLMSection
    tools: ToolsSection
    agents: AgentsSection = AgentsSection()
    tasks: TasksSection = TasksSection()
    trajectories: TrajectoriesSection = TrajectoriesSection()
    filter: FilterSection = FilterSection()
    output: OutputSection = OutputSection()

    _base_dir: Path = PrivateAttr(default_factory=Path)  # where relative paths start (set by the loader)

    def path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self._base_dir / path

    @property
    def out_path(self) -> Path:
        return self.path(self.out_dir)

    def domains(self) -> list[Domain]:
        if isinstance(self.tools.domains, str):
            return load_model_file(DomainFile, self.path(self.tools.domains)).domains
        return self.tools.domains


def load_synth_config(path: str | Path, overrides: list[str] = ()) -> SynthConfig:
    """The YAML file plus `--set a.b=c` overrides, validated (errors name file:line and key)."""
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise ValidationFailed(f"{path}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
        lines[tuple(assignment.split("=", 1)[0].strip().split("."))] = f"--set {assignment}"
    config = validate(SynthConfig, data, str(path), lines)
    config._base_dir = Path(path).resolve().parent
    return config
