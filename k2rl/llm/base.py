"""What every chat backend takes and returns, so callers (judge, data synthesis) do not care whether
the model sits behind HTTP or is the colocated policy engine."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, fields
from typing import Protocol

import pydantic


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion. With `schema`, the reply must parse into that pydantic model."""

    messages: list[dict]
    schema: type[pydantic.BaseModel] | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int | None = None

    def json_schema(self) -> dict | None:
        return inline_refs(self.schema.model_json_schema()) if self.schema else None


@dataclass(frozen=True)
class Completion:
    text: str
    value: pydantic.BaseModel | None = None
    cached: bool = False
    repaired: bool = False
    attempts: int = 1


class LLMFailure(Exception):
    """A request that failed for good (after retries).
    `kind`: timeout, connection, server (5xx/429), http (other 4xx), invalid (output unusable)."""

    def __init__(self, kind: str, message: str, attempts: int = 1):
        super().__init__(f"{kind}: {message} (after {attempts} attempt(s))")
        self.kind, self.message, self.attempts = kind, message, attempts


@dataclass
class CallStats:
    """Running counters for metrics; safe to update from worker threads."""

    requests: int = 0
    cache_hits: int = 0
    attempts: int = 0
    retries: int = 0
    timeouts: int = 0
    invalid: int = 0
    repaired: int = 0
    failures: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


class ChatBackend(Protocol):
    stats: CallStats

    def complete_many(self, requests: list[ChatRequest]) -> list[Completion | LLMFailure]:
        """One result per request, in order; a failure is returned, never raised."""


def inline_refs(schema: dict) -> dict:
    """Replace pydantic's `$defs`/`$ref` with the definitions themselves: grammar backends and some
    endpoints handle a self-contained schema more reliably."""
    defs = schema.get("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return json.loads(json.dumps(resolve(schema)))
