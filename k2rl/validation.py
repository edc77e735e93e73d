"""YAML in, pydantic model out, with errors that name the file, the line, the key path and the fix.

Config files and rubric files both go through here, so every bad input reads the same way:
    configs/x.yaml:12: algorithm.nmae: unknown key (did you mean 'name'?)
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

Model = TypeVar("Model", bound=pydantic.BaseModel)


class ValidationFailed(ValueError):
    """Bad input; the message lists every problem, one per line."""


def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            out[sub] = key.start_mark.line + 1
            _line_index(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_index(item, path + (i,), out)
    return out


def load_yaml(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file; returns the data and a key-path -> line map. Syntax errors name the line."""
    path = Path(path)
    if not path.exists():
        raise ValidationFailed(f"{path}: file not found")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValidationFailed(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    return (data if data is not None else {}), (_line_index(node) if node is not None else {})


def _fields_at(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """Field names of the (sub)model that owns `loc`'s last key, for 'did you mean'."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list field: `current` is already the item's model
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return []
        current = _submodel(fields[part].annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _submodel(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The pydantic model inside an annotation such as `Sub`, `Sub | None` or `list[Sub]`."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if found := _submodel(arg):
            return found
    return None


def describe_errors(err: pydantic.ValidationError, model: type[pydantic.BaseModel], source: str,
                    lines: dict[tuple, int | str] | None = None) -> str:
    """One line per problem: where, which key, what was given, what is allowed.

    `lines` maps key paths to a line number in `source`, or to a full location string (for values
    that came from elsewhere, such as a command-line override).
    """
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = None
        if lines:
            for n in range(len(loc), 0, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
        where = source if line is None else line if isinstance(line, str) else f"{source}:{line}"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            allowed = ", ".join(_fields_at(model, loc))
            out.append(f"{where}: {key}: unknown key{hint}; valid keys here: {allowed}")
        elif e["type"] == "missing":
            out.append(f"{where}: {key}: required field is missing")
        else:
            given = f" (got {e.get('input')!r})" if loc and not isinstance(e.get("input"), dict) else ""
            out.append(f"{where}: {key}: {e['msg']}{given}")
    return "\n".join(out)


def validate(model: type[Model], data: Any, source: str, lines: dict[tuple, int] | None = None) -> Model:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise ValidationFailed(describe_errors(err, model, source, lines)) from None


def load_model_file(model: type[Model], path: str | Path) -> Model:
    """Load and validate a YAML file into `model`; every error names the file and line."""
    data, lines = load_yaml(path)
    return validate(model, data, str(path), lines)
