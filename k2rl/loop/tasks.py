"""Where tasks come from: an endless, resumable stream for training and a fixed held-out set.

Training draws chunks `factory.tasks(CHUNK, seed=train_seed + k * CHUNK)`; for the generated built-in
domains that is seeds train_seed, train_seed+1, ... in order, so the stream is a pure function of
(train_seed, cursor) and a resumed run continues exactly where it stopped. Held-out tasks come from
`eval_seed` (far from the training seeds) and any that share an id with a training task seen so far
are impossible by construction for generated domains.

With a `pool` (`env.train_tasks`) training is a finite data set: the pool's tasks are the first
`pool` of that stream, and every pass over them (an epoch) takes them in an order shuffled by
(train_seed, epoch), again a pure function of the cursor.
"""
from __future__ import annotations

import random

from k2rl.env.factory import EnvFactory
from k2rl.env.kinds import task_type
from k2rl.env.task import Task
from k2rl.loop.priority import TypePriority
from k2rl.model.chat import ChatTokenizer
from k2rl.rollout.episode import Episode, Limits
from k2rl.validation import ValidationFailed

CHUNK = 1024


class TaskStream:
    def __init__(self, factory: EnvFactory, seed: int, cursor: int = 0, pool: int | None = None):
        self.factory, self.seed, self.cursor, self.pool = factory, seed, cursor, pool
        self._chunk_index, self._chunk = -1, []
        self._pool_tasks = self._load_pool() if pool is not None else None
        self._chunk_containing(cursor)  # the task source read now: a bad one fails before any worker starts

    def _load_pool(self) -> list[Task]:
        tasks = self.factory.tasks(self.pool, seed=self.seed)
        if len(tasks) < self.pool:
            raise ValidationFailed(f"env.train_tasks is {self.pool}, but the environment's task source holds "
                                   f"{len(tasks)} tasks: set env.train_tasks to at most that, or unset it")
        return tasks

    def _chunk_at(self, index: int) -> list[Task]:
        if self.pool is None:
            return self.factory.tasks(CHUNK, seed=self.seed + index * CHUNK)
        epoch = list(self._pool_tasks)
        random.Random(f"{self.seed}:epoch {index}").shuffle(epoch)
        return epoch

    def _chunk_containing(self, cursor: int) -> list[Task]:
        index = cursor // (self.pool or CHUNK)
        if index != self._chunk_index:
            self._chunk, self._chunk_index = self._chunk_at(index), index
            if not self._chunk:
                raise ValidationFailed(f"environment {self.factory.env_cls.name!r} produced no tasks")
        return self._chunk

    def next(self, count: int, priority: TypePriority | None = None) -> list[Task]:
        """The next `count` tasks; with `priority`, each task in turn is kept with its type's weight
        (the draw seeded by seed and cursor, so a resumed run keeps the same ones) and the rest skipped."""
        out = []
        while len(out) < count:
            chunk = self._chunk_containing(self.cursor)
            task = chunk[self.cursor % (self.pool or CHUNK) % len(chunk)]
            if priority is None or priority.accept(task.tags, random.Random(f"{self.seed}:{self.cursor}")):
                out.append(task)
            self.cursor += 1
        return out


def held_out_tasks(factory: EnvFactory, count: int, seed: int) -> list[Task]:
    return factory.tasks(count, seed=seed) if count else []


def check_first_turn_fits(factory: EnvFactory, seed: int, chat: ChatTokenizer, max_new_tokens: int,
                          max_model_len: int) -> None:
    """The first training task's opening prompt (tool declarations, system prompt, the user's first
    message) and one full reply must fit the context: otherwise every episode ends before it starts."""
    task = factory.tasks(1, seed=seed)[0]
    episode = Episode(factory(), task, chat, Limits())
    episode.start()
    if episode.prompt_len + max_new_tokens > max_model_len:
        raise ValidationFailed(
            f"rollout.max_model_len is {max_model_len}, but task {task.id}'s opening prompt (tool declarations, "
            f"system prompt, the user's first message) is {episode.prompt_len} tokens, which leaves no room for a "
            f"reply of algorithm.max_new_tokens ({max_new_tokens}): raise rollout.max_model_len to at least "
            f"{episode.prompt_len + max_new_tokens}")


def check_task_types(factory: EnvFactory, seed: int, types: list[str], field: str) -> None:
    """A config that names task types (`field`) must name ones the training tasks have: a misspelt type
    would otherwise match nothing, silently."""
    seen = {task_type(task.tags) for task in factory.tasks(CHUNK, seed=seed)}
    unknown = sorted(set(types) - seen)
    if unknown:
        raise ValidationFailed(f"{field} names task types {unknown} that environment {factory.env_cls.name!r} does not "
                               f"have (a type is a task's first tag); its training tasks' types: {sorted(seen)}")
