"""Structured generation for the synthesis stages, through the shared `k2rl.llm` client."""
from __future__ import annotations

import dataclasses
import json
import re
from typing import TypeVar

from pydantic import BaseModel

from k2rl.llm import ChatRequest, LLMClient, ResponseCache, content_key
from k2rl.synth.config import SynthConfig

M = TypeVar("M", bound=BaseModel)


def make_client(config: SynthConfig, base_url: str | None = None, model: str | None = None) -> LLMClient:
    """The synthesis client: concurrency, timeouts, retries and the on-disk cache from `config.llm`."""
    llm = config.llm
    cache = ResponseCache(config.out_path / llm.cache_dir) if llm.cache_dir else ResponseCache()
    return LLMClient(base_url or llm.base_url, model or llm.model, llm.api_key, concurrency=llm.concurrency,
                     timeout_s=llm.timeout_s, retries=llm.retries, cache=cache)


def item_seed(config: SynthConfig, key: str) -> int:
    """A sampling seed per work item: diverse across items, the same on a rerun (so the cache hits)."""
    return int(content_key([config.seed, key])[:8], 16)


def max_chars(schema: dict) -> int:
    """An upper bound on the compact JSON text of any value `schema` admits (bounded strings and lists).
    A token is at least one character, so twice this (an escape such as \\uXXXX takes several
    characters) is a max_tokens that does not cut a schema-bound answer short even when every field
    is filled."""
    if "anyOf" in schema:
        return max(max_chars(s) for s in schema["anyOf"])
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    if "const" in schema:
        return len(json.dumps(schema["const"]))
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return 2 + sum(len(k) + 4 + max_chars(v) for k, v in props.items())
    if kind == "array":
        return 2 + schema.get("maxItems", 8) * (max_chars(schema.get("items", {})) + 1)
    if kind == "string":
        pattern = re.search(r"\{\d+,(\d+)\}\$$", schema.get("pattern", ""))
        return 2 + (int(pattern.group(1)) + 1 if pattern else schema.get("maxLength", 256))
    return 24  # numbers, booleans, null, unconstrained


def token_budget(request: ChatRequest, most: int = 3072) -> int:
    return min(most, 2 * max_chars(request.json_schema()))


def ask(client: LLMClient, system: str, user: str, schema: type[M], *, temperature: float, seed: int) -> M:
    """One structured answer (max_tokens from the schema's bound); raises `LLMFailure` when the client
    gives up."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    request = ChatRequest(messages, schema, temperature=temperature, seed=seed)
    request = dataclasses.replace(request, max_tokens=token_budget(request))
    return client.complete(request).value
