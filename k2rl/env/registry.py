"""Find an environment class by name: a built-in, a `package.module:Class` path, a `path/to/file.py:Class`
path, or a name another package registered under the `k2rl.envs` entry-point group.
(`:Class` may be left out when the module defines exactly one Environment.)"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path

from k2rl.env.environment import Environment
from k2rl.validation import ValidationFailed

BUILTINS = {
    "airline": "envs.airline:Airline",
    "bank": "envs.bank:Bank",
    "calendar": "envs.calendar:Calendar",
    "shop": "envs.shop:Shop",
    "synthetic": "envs.synthetic:Synthetic",
}
GROUP = "k2rl.envs"


def available() -> dict[str, str]:
    """Every name `load_env` accepts as a plain name -> where it comes from."""
    found = dict(BUILTINS)
    found.update({ep.name: ep.value for ep in entry_points(group=GROUP)})
    return found


def load_env(spec: str) -> type[Environment]:
    if spec in BUILTINS:
        return _from_path(BUILTINS[spec])
    plugins = {ep.name: ep for ep in entry_points(group=GROUP)}
    if spec in plugins:
        return _checked(plugins[spec].load(), spec)
    if ":" in spec or "." in spec or spec.endswith(".py"):
        return _from_path(spec)
    raise ValidationFailed(f"unknown environment {spec!r}; known: {', '.join(sorted(available()))}; "
                           f"or give a path like my_pkg.my_env:MyEnv or ./my_env.py:MyEnv")


def _from_path(spec: str) -> type[Environment]:
    module_part, _, attr = spec.partition(":")
    if module_part.endswith(".py"):
        path = Path(module_part).resolve()
        if not path.exists():
            raise ValidationFailed(f"environment file {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"k2rl_user_env_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as err:
            raise ValidationFailed(f"cannot import {module_part!r} for environment {spec!r}: {err}") from None
    if attr:
        if not hasattr(module, attr):
            raise ValidationFailed(f"{module_part} has no attribute {attr!r}")
        return _checked(getattr(module, attr), spec)
    own = [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, Environment)
           and c.__module__ == module.__name__]
    if len(own) != 1:
        raise ValidationFailed(f"{module_part} defines {len(own)} Environment classes; name one as {module_part}:Class")
    return own[0]


def _checked(obj, spec: str) -> type[Environment]:
    if not (inspect.isclass(obj) and issubclass(obj, Environment)):
        raise ValidationFailed(f"{spec} is {obj!r}, not a k2rl.env.Environment subclass")
    return obj
