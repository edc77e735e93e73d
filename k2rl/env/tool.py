"""A tool: a name, a description, a pydantic model of its arguments and a function over env state.

The argument model's JSON Schema is what the model sees in the tool declaration, and the same model
validates the arguments the model wrote, so declaration and validation can never drift apart.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable

import pydantic

from k2rl.llm.base import inline_refs


class ToolError(Exception):
    """An expected failure (no such order, not enough funds): the model sees the message, the call
    still counts as valid."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    args: type[pydantic.BaseModel]
    fn: Callable[..., Any]  # fn(env, **arguments)

    def declaration(self) -> dict:
        """K2's tool_declare entry (a fresh copy: every episode's prompt starts from it)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": copy.deepcopy(self._schema)}}

    @functools.cached_property
    def _schema(self) -> dict:
        """Built once: pydantic's schema generation was a third of an oracle dialog's time."""
        return compact_schema(self.args)

    def parse(self, arguments: str) -> dict[str, Any]:
        """Arguments text -> validated keyword arguments; raises ValueError with a readable message."""
        try:
            raw = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"arguments are not valid JSON ({err.msg} at char {err.pos})") from None
        try:
            model = self.args.model_validate(raw)
        except pydantic.ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in err.errors())
            raise ValueError(f"invalid arguments for {self.name}: {problems}") from None
        return {name: getattr(model, name) for name in type(model).model_fields}


def tool(fn: Callable | None = None, *, name: str | None = None, args: type[pydantic.BaseModel] | None = None):
    """Mark an Environment method as a tool.

    The description is the docstring; the argument model is `args` or is built from the signature
    (type hints, defaults, `Annotated[..., Field(description=...)]`), with unknown keys forbidden.
    """
    def wrap(method: Callable) -> Callable:
        method.__k2rl_tool__ = Tool(name or method.__name__, inspect.getdoc(method) or "",
                                    args or _args_model(method), method)
        return method

    return wrap(fn) if fn is not None else wrap


def _args_model(method: Callable) -> type[pydantic.BaseModel]:
    hints = inspect.get_annotations(method, eval_str=True)
    fields = {}
    for param in list(inspect.signature(method).parameters.values())[1:]:  # skip self
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {method.__name__}: *args/**kwargs cannot be declared to the model")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    return pydantic.create_model(f"{method.__name__}_args", __config__=pydantic.ConfigDict(extra="forbid"), **fields)


def compact_schema(model: type[pydantic.BaseModel]) -> dict:
    """JSON Schema without pydantic's titles and $refs: every token of it lands in the prompt."""
    def strip(node, in_properties=False):
        if isinstance(node, dict):
            return {k: strip(v, k == "properties" and not in_properties) for k, v in node.items()
                    if in_properties or k != "title"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    schema = strip(inline_refs(model.model_json_schema()))
    schema.pop("additionalProperties", None)
    return schema
