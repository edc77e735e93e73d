"""Content-addressed response cache: the same request (model, messages, schema, sampling) is answered
once. Memory (bounded LRU) in front of an optional directory shared across runs and processes."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any


def content_key(payload: Any) -> str:
    """sha256 of the canonical JSON of `payload`."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """Maps a content key to the raw text of a response that passed validation."""

    def __init__(self, directory: str | Path | None = None, max_memory: int = 10_000):
        self.directory = Path(directory) if directory else None
        self.max_memory = max_memory
        self._memory: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        if self.directory and self._path(key).exists():
            text = json.loads(self._path(key).read_text())["text"]
            self._remember(key, text)
            return text
        return None

    def put(self, key: str, text: str) -> None:
        self._remember(key, text)
        if self.directory:
            path = self._path(key)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"text": text}, ensure_ascii=False))
            os.replace(tmp, path)  # atomic: concurrent writers never leave a torn entry

    def _remember(self, key: str, text: str) -> None:
        with self._lock:
            self._memory[key] = text
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_memory:
                self._memory.popitem(last=False)
