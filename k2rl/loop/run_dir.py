"""The run directory (DESIGN.md): resolved config, metrics, rollouts, checkpoints with a `latest` pointer.

A checkpoint is written to `step_N.tmp/` and renamed when complete, then `latest` is updated, so a
run killed at any moment resumes from the last complete checkpoint.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from k2rl.config import JobConfig, dump_config


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.rollouts = self.path / "rollouts"

    def create(self, config: JobConfig) -> None:
        for folder in (self.path, self.checkpoints, self.rollouts):
            folder.mkdir(parents=True, exist_ok=True)
        dump_config(config, self.path / "config.yaml")

    def write_rollouts(self, name: str, records: list[dict]) -> None:
        """rollouts/NAME.jsonl: step_N (training episodes) or eval_step_N (held-out greedy episodes)."""
        with (self.rollouts / f"{name}.jsonl").open("w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def begin_checkpoint(self, step: int) -> Path:
        tmp = self.checkpoints / f"step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, step: int, tmp: Path, state: dict, keep: int) -> Path:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        final = self.checkpoint_dir(step)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (self.checkpoints / "latest.tmp").write_text(final.name)
        (self.checkpoints / "latest.tmp").rename(self.checkpoints / "latest")
        for old in self.completed()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def completed(self) -> list[Path]:
        done = [p for p in self.checkpoints.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                and (p / "trainer_state.json").exists()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def latest_state(self) -> tuple[Path, dict] | None:
        """The latest complete checkpoint and its trainer state (step, cursor), or None without one."""
        latest = self.latest()
        return (latest, json.loads((latest / "trainer_state.json").read_text())) if latest else None

    def latest(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if pointer.exists() and (self.checkpoints / pointer.read_text().strip() / "trainer_state.json").exists():
            return self.checkpoints / pointer.read_text().strip()
        done = self.completed()
        return done[-1] if done else None


def save_rng_state(path: Path) -> None:
    """The driver's Python, NumPy and torch RNG states (its sampling decisions), for exact resume."""
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, path)


def load_rng_state(path: Path) -> None:
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
