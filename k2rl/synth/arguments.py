"""A tool's JSON Schema as a pydantic arguments model: what validates the agent's calls before the
tool simulator sees them, and what the synthetic environment declares. Top-level properties map to
typed fields (aliased when the name is not an identifier: dump `by_alias`); nested schemas stay as
plain lists and dicts."""
from __future__ import annotations

import re
from typing import Any, Literal, Optional

import pydantic

from k2rl.synth.schemas import ToolSpec

_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list, "object": dict}


def _field_type(schema: dict) -> Any:
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return Literal[tuple(schema["enum"])]
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        kinds = [_TYPES[k] for k in kind if k in _TYPES]
        return (kinds[0] | None) if len(kinds) == 1 else Any
    return _TYPES.get(kind, Any)


def args_model(spec: ToolSpec) -> type[pydantic.BaseModel]:
    properties = spec.parameters.get("properties") or {}
    required = set(spec.parameters.get("required") or [])
    fields = {}
    for name, schema in properties.items():
        schema = schema if isinstance(schema, dict) else {}
        annotation = _field_type(schema)
        safe = name if name.isidentifier() and not name.startswith("_") else "f_" + re.sub(r"\W", "_", name)
        field = pydantic.Field(... if name in required else None, alias=name if safe != name else None,
                               description=schema.get("description"))
        fields[safe] = (annotation if name in required else Optional[annotation], field)
    extra = "allow" if spec.parameters.get("additionalProperties") is True else "forbid"
    return pydantic.create_model(f"{spec.name.replace('-', '_').replace('.', '_')}_args",
                                 __config__=pydantic.ConfigDict(extra=extra), **fields)
