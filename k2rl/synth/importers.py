"""Existing tool specs into the catalog: MCP `tools/list` JSON and OpenAI function specs, plus
deduplication by name and by schema (same description words and argument schema under another name)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pydantic import ValidationError

from k2rl.synth.schemas import ToolSpec
from k2rl.validation import ValidationFailed


def _entries(data) -> list[dict]:
    if isinstance(data, dict):
        for key in ("tools", "functions"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    if isinstance(data, list):
        return data
    raise ValueError("expected a JSON object or list of tool specs")


def spec_from_entry(entry: dict, domain: str = "") -> ToolSpec:
    """One MCP tool (`name`, `description`, `inputSchema`) or OpenAI function (bare, or under
    `{"type": "function", "function": ...}`) as a ToolSpec."""
    if "inputSchema" in entry or "input_schema" in entry:
        schema, source = entry.get("inputSchema", entry.get("input_schema")), "mcp"
    else:
        entry = entry.get("function", entry)
        schema, source = entry.get("parameters", {"type": "object", "properties": {}}), "openai"
    return ToolSpec(name=entry.get("name", ""), description=entry.get("description") or "", parameters=schema,
                    domain=domain, source=source)


def import_specs(path: str | Path) -> list[ToolSpec]:
    """All tool specs in a `.json` file (object or list) or `.jsonl` file (one spec per line).
    Errors name the file and the entry."""
    path = Path(path)
    if not path.exists():
        raise ValidationFailed(f"{path}: file not found")
    text = path.read_text()
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else _entries(json.loads(text))
    except (json.JSONDecodeError, ValueError) as err:
        raise ValidationFailed(f"{path}: {err}") from None
    specs = []
    for i, row in enumerate(rows):
        try:
            specs.append(spec_from_entry(row, domain=path.stem))
        except (ValidationError, AttributeError) as err:
            raise ValidationFailed(f"{path}: tool #{i}: not an MCP or OpenAI tool spec: {err}") from None
    return specs


def dedup(tools: list[ToolSpec]) -> tuple[list[ToolSpec], Counter]:
    """First occurrence wins; the counter says how many were dropped as a `name` or `schema` duplicate."""
    names, schemas, kept, dropped = set(), set(), [], Counter()
    for tool in tools:
        if tool.name in names:
            dropped["name"] += 1
        elif tool.schema_key() in schemas:
            dropped["schema"] += 1
        else:
            names.add(tool.name)
            schemas.add(tool.schema_key())
            kept.append(tool)
    return kept, dropped
