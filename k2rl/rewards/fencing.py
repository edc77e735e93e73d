"""The transcript under judgement goes to the judge as data, never as instructions.

It is JSON-encoded with `<`, `>` and `&` escaped (so no chat special token such as `<|im_end|>` and no
fence marker can appear in it), between marker lines carrying a nonce derived from the content itself
(text cannot contain its own hash, and a content-derived nonce keeps the response cache effective).
The judge's system prompt names the markers and says everything between them is data.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fenced:
    begin: str
    end: str
    block: str  # begin line, JSON payload, end line


def encode_data(payload: Any) -> str:
    """JSON with every character that could form a marker or a special token escaped."""
    text = json.dumps(payload, ensure_ascii=True, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def fence(payload: Any) -> Fenced:
    data = encode_data(payload)
    nonce = hashlib.sha256(data.encode()).hexdigest()[:24]
    begin, end = f"<<<DATA {nonce}>>>", f"<<<END DATA {nonce}>>>"
    return Fenced(begin, end, f"{begin}\n{data}\n{end}")

