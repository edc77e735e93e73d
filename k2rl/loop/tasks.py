"""Where tasks come from: an endless, resumable stream for training and a fixed held-out set.

Training draws chunks `EnvCls.tasks(CHUNK, seed=train_seed + k * CHUNK)`; for the generated built-in
domains that is seeds train_seed, train_seed+1, ... in order, so the stream is a pure function of
(train_seed, cursor) and a resumed run continues exactly where it stopped. Held-out tasks come from
`eval_seed` (far from the training seeds) and any that share an id with a training task seen so far
are impossible by construction for generated domains.
"""
from __future__ import annotations

from k2rl.env.environment import Environment
from k2rl.env.task import Task

CHUNK = 1024


class TaskStream:
    def __init__(self, env_cls: type[Environment], seed: int, cursor: int = 0):
        self.env_cls, self.seed, self.cursor = env_cls, seed, cursor
        self._chunk_index, self._chunk = -1, []

    def next(self, count: int) -> list[Task]:
        out = []
        while len(out) < count:
            index, offset = divmod(self.cursor, CHUNK)
            if index != self._chunk_index:
                self._chunk = self.env_cls.tasks(CHUNK, seed=self.seed + index * CHUNK)
                self._chunk_index = index
                if not self._chunk:
                    raise ValueError(f"environment {self.env_cls.name!r} produced no tasks")
            out.append(self._chunk[offset % len(self._chunk)])
            self.cursor += 1
        return out


def held_out_tasks(env_cls: type[Environment], count: int, seed: int) -> list[Task]:
    return env_cls.tasks(count, seed=seed) if count else []
