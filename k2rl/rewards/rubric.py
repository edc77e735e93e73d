"""Rubric files: YAML criteria (id, description, weight, kind), validated with errors naming file:line.

A rubric may `include` others by name, so `tool_use` is the core and prescriptive rubrics plus its own
criteria. Names resolve to `rubrics/NAME.yaml` in the repository; anything else is a path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from k2rl.validation import ValidationFailed, load_model_file

RUBRICS_DIR = Path(__file__).resolve().parents[2] / "rubrics"


class Criterion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="a key of the judge's JSON verdict")
    description: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)
    kind: Literal["core", "prescriptive", "task"] = "task"


class Rubric(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    include: list[str] = []
    criteria: list[Criterion] = []

    @field_validator("criteria")
    @classmethod
    def _unique_ids(cls, criteria: list[Criterion]) -> list[Criterion]:
        seen = set()
        for c in criteria:
            if c.id in seen:
                raise ValueError(f"criterion id {c.id!r} appears twice")
            seen.add(c.id)
        return criteria

    def with_criteria(self, extra: list[Criterion]) -> Rubric:
        """This rubric plus task-specific criteria (a synthesized task's own success criteria)."""
        return self if not extra else Rubric(name=self.name, description=self.description,
                                             criteria=[*self.criteria, *extra])


def rubric_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    known = sorted(p.stem for p in RUBRICS_DIR.glob("*.yaml"))
    candidate = RUBRICS_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise ValidationFailed(f"rubric {name_or_path!r}: not a file and not one of {known} in {RUBRICS_DIR}")
    return candidate


def load_rubric(name_or_path: str | Path, _chain: tuple[Path, ...] = ()) -> Rubric:
    """A rubric with its includes resolved (criteria of includes first, then its own)."""
    path = rubric_path(name_or_path).resolve()
    if path in _chain:
        raise ValidationFailed(f"{path}: include cycle: {' -> '.join(p.stem for p in (*_chain, path))}")
    rubric = load_model_file(Rubric, path)
    criteria = [c for inc in rubric.include for c in load_rubric(inc, (*_chain, path)).criteria]
    try:
        merged = Rubric(name=rubric.name, description=rubric.description, criteria=[*criteria, *rubric.criteria])
    except ValueError as err:
        raise ValidationFailed(f"{path}: criteria (with includes {rubric.include}): {err}") from None
    if not merged.criteria:
        raise ValidationFailed(f"{path}: criteria: a rubric needs at least one criterion")
    return merged
