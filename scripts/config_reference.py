"""Print the job config reference (every section, key, type, default, note) as Markdown for the README.

    python scripts/config_reference.py
"""
import typing

from pydantic import BaseModel

from k2rl.config import JobConfig


def _type(annotation) -> str:
    text = repr(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace("NoneType", "None").replace("|", "\\|")


def rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from rows(sub, f"{prefix}{name}.")
            continue
        default = field.default
        note = (field.description or "").replace("|", "/")
        yield f"| `{prefix}{name}` | `{_type(sub)}` | `{default!r}` | {note} |"


def main() -> None:
    print("| key | type | default | note |\n|---|---|---|---|")
    for line in rows(JobConfig):
        print(line)


if __name__ == "__main__":
    main()
