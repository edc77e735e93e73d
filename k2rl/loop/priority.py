"""Prioritized task sampling by task type: Kimi k1.5's prioritized sampling, per task type (a task's
first tag: buy_one, status, ...) instead of per problem, since generated tasks are fresh each step.

Why: a group baseline (K2, GRPO) learns only from groups whose K samples disagree. A type the policy
always solves (or never) yields none, and in a uniform mix the types with headroom are a few tasks a
step: on the shop, order-status tasks are ~10% of the mix, so one step's status gradient came from one
or two tasks and their particular status words, and RL swapped one constant answer for another
instead of learning to read it (README, "The CPU demo"). Here a type is drawn in proportion to the
chance that a group of K of its tasks disagrees, 1 - s^K - (1 - s)^K, at its recent success rate s
in this run's own rollouts; at least `FLOOR`, so solved types still show up (PTX keeps them too).
Types not yet seen weigh 1.
"""
from __future__ import annotations

import random

from k2rl.env.kinds import task_type

FLOOR = 0.05
DECAY = 0.7  # weight of the previous estimate per step: about the last three steps count


class TypePriority:
    def __init__(self, samples_per_task: int, success: dict[str, float] | None = None):
        self.k = samples_per_task
        self.success = dict(success or {})  # task type -> recent success rate (an exponential average)

    def weight(self, type_: str) -> float:
        s = self.success.get(type_)
        return 1.0 if s is None else max(FLOOR, 1.0 - s ** self.k - (1.0 - s) ** self.k)

    def accept(self, tags: list[str], draw: random.Random) -> bool:
        return draw.random() < self.weight(task_type(tags))

    def update(self, trajectories) -> None:
        """Fold one step's rollouts into each type's success rate."""
        solved: dict[str, list[bool]] = {}
        for t in trajectories:
            solved.setdefault(task_type(t.tags), []).append(bool(t.success))
        for type_, outcomes in solved.items():
            rate = sum(outcomes) / len(outcomes)
            old = self.success.get(type_)
            self.success[type_] = rate if old is None else DECAY * old + (1 - DECAY) * rate

    def metrics(self) -> dict[str, float]:
        return {f"tasks/weight/{type_}": self.weight(type_) for type_ in sorted(self.success)}
