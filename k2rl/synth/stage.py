"""A resumable stage: work items in, one JSONL record per finished item out.

Each finished item is appended and flushed at once, so a killed run loses only the items in flight;
on the next run items whose id is already on disk are skipped. A torn last line (killed mid-write) is
cut off before appending. Items that fail (an `LLMFailure` after the client's retries, or output that
never fits) are written to `NAME.errors.jsonl` and tried again on the next run.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from pydantic import ValidationError
from tqdm import tqdm

from k2rl.llm import LLMFailure
from k2rl.synth.schemas import Record

R = TypeVar("R", bound=Record)
RUN_ID = f"{os.getpid()}-{os.urandom(3).hex()}"


@dataclass
class StageResult(Generic[R]):
    records: list[R]  # every finished item, in item order (earlier runs included)
    resumed: int  # items found finished on disk
    errors: Counter = field(default_factory=Counter)  # failure kind -> count, this run


def read_records(path: Path, model: type[R]) -> list[R]:
    """Valid lines of a stage file; a torn or foreign line is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(model.model_validate_json(line))
        except ValidationError:
            continue
    return out


def _cut_torn_tail(path: Path) -> None:
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            path.write_bytes(data[:data.rfind(b"\n") + 1])


class Stage(Generic[R]):
    def __init__(self, name: str, out_dir: Path, model: type[R], *, workers: int = 4, progress: bool = True):
        self.name, self.model, self.workers, self.progress = name, model, workers, progress
        self.path = Path(out_dir) / f"{name}.jsonl"
        self.errors_path = Path(out_dir) / f"{name}.errors.jsonl"

    def run(self, items: dict[str, object], work: Callable[[str, object], R]) -> StageResult[R]:
        """`items`: id -> input. `work(id, input)` returns the record (its id must be that id)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        done = {r.id: r for r in read_records(self.path, self.model) if r.id in items}
        todo = [key for key in items if key not in done]
        errors: Counter = Counter()
        bar = tqdm(total=len(items), initial=len(done), desc=self.name, unit="item", disable=not self.progress,
                   dynamic_ncols=True)
        with open(self.path, "a") as out, open(self.errors_path, "w") as err_out, \
                ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            futures = {pool.submit(work, key, items[key]): key for key in todo}
            for future in as_completed(futures):
                key = futures[future]
                try:
                    record = future.result()
                except (LLMFailure, ValueError) as err:
                    kind = err.kind if isinstance(err, LLMFailure) else "invalid"
                    errors[kind] += 1
                    err_out.write(json.dumps({"id": key, "kind": kind, "error": str(err)[:500]}) + "\n")
                    err_out.flush()
                    bar.update(1)
                    continue
                record.run = RUN_ID
                out.write(record.model_dump_json() + "\n")  # only this thread writes
                out.flush()
                done[key] = record
                bar.update(1)
        bar.close()
        return StageResult([done[k] for k in items if k in done], resumed=len(items) - len(todo), errors=errors)
