"""Lenient JSON: what judges and simulators actually emit, turned into validated pydantic objects.

Constrained decoding (vLLM + xgrammar) keeps the structure but may put raw control characters in
strings; endpoints without structured output wrap JSON in prose or code fences, leave trailing commas
or stop mid-object at max_tokens. We parse with `strict=False`, and on failure repair those cases.
"""
from __future__ import annotations

import json
import re
from typing import Any, TypeVar

import pydantic

Model = TypeVar("Model", bound=pydantic.BaseModel)

_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.DOTALL)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


class ParseError(ValueError):
    """The text holds no JSON value that fits the schema, even after repair."""


def _close_open(text: str) -> str:
    """Close a string, arrays and objects left open (output cut at max_tokens)."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    if in_string:
        text += "\\" if escaped else ""
        text += '"'
    text = text.rstrip().rstrip(",")
    if text.endswith(":"):
        text += " null"
    return text + "".join(reversed(stack))


def repair(text: str) -> str:
    """Best-effort JSON from model text: unwrap code fences and prose, drop trailing commas, close."""
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    start = text.find("{")
    if start < 0:
        raise ParseError(f"no JSON object in output: {text[:80]!r}")
    end = text.rfind("}")
    body = text[start:end + 1] if end > start else text[start:]
    try:
        json.loads(body, strict=False)
    except json.JSONDecodeError:
        body = _close_open(_TRAILING_COMMA.sub(r"\1", body))
    return _TRAILING_COMMA.sub(r"\1", body)


def parse_json(text: str) -> tuple[Any, bool]:
    """(value, repaired): the JSON in `text`; `repaired` says the text needed fixing first."""
    try:
        return json.loads(text, strict=False), False
    except json.JSONDecodeError:
        pass
    try:
        return json.loads(repair(text), strict=False), True
    except json.JSONDecodeError as err:
        raise ParseError(f"unparseable JSON even after repair: {err}") from None


def parse_model(text: str, model: type[Model]) -> tuple[Model, bool]:
    """(object, repaired): `text` parsed leniently and validated against `model`."""
    value, repaired = parse_json(text)
    try:
        return model.model_validate(value), repaired
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ParseError(f"output does not fit {model.__name__}: {where}: {first['msg']}") from None
