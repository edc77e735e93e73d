"""One scalar reward per episode from its parts, weighted by `rewards.weights` (config, or a task's
own weights): verifiable end state + process (milestones) + rubric score - budget penalty - unsolved
penalty (an action task left unsolved, whatever the reply says: declining, a false "done" and silence
cost the same, see docs/rewards.md) - optional extra wrong-refusal penalty - format penalty (the share
of broken calls: RL must not trade valid tool calls for end-state reward).

A part a task does not have (no checker, judge off) is None: it adds nothing and is left out of that
part's logged mean. Every part is logged per step as reward/NAME, unweighted, beside reward/total.
"""
from __future__ import annotations

from dataclasses import dataclass

from k2rl.config import RewardWeights

PARTS = ("verifiable", "process", "rubric", "budget", "unsolved", "wrong_refusal", "format")


@dataclass(frozen=True)
class RewardParts:
    verifiable: float | None = None  # end-state / answer check, in [0, 1]
    process: float | None = None  # share of required milestone calls made, in [0, 1]
    rubric: float | None = None  # judge score, in [0, 1]
    over_budget: bool = False  # the response hit the task's token budget and was truncated (K2)
    unsolved: bool | None = None  # an action task that ended unsolved (None: task kind unknown)
    wrong_refusal: bool | None = None  # ... and whose final reply declines
    broken_calls: float = 0.0  # share of tool calls and turns that were malformed or invalid, in [0, 1]


@dataclass(frozen=True)
class Reward:
    total: float
    components: dict[str, float]  # unweighted parts present: verifiable, process, rubric, budget (0 or -1),
    # unsolved (0 or -1), wrong_refusal (0 or -1), format (-broken_calls)


def combine(parts: RewardParts, weights: RewardWeights) -> Reward:
    components = {name: getattr(parts, name) for name in ("verifiable", "process", "rubric")
                  if getattr(parts, name) is not None}
    components["budget"] = -1.0 if parts.over_budget else 0.0
    for name in ("unsolved", "wrong_refusal"):
        if getattr(parts, name) is not None:
            components[name] = -1.0 if getattr(parts, name) else 0.0
    components["format"] = -parts.broken_calls
    total = sum(getattr(weights, name) * value for name, value in components.items())
    return Reward(total, components)


def reward_metrics(rewards: list[Reward], judge_failures: int = 0) -> dict[str, float]:
    """Step means: reward/total, reward/NAME per part present in any episode, reward/judge_failures."""
    if not rewards:
        return {"reward/judge_failures": float(judge_failures)}
    out = {"reward/total": sum(r.total for r in rewards) / len(rewards)}
    for name in PARTS:
        values = [r.components[name] for r in rewards if name in r.components]
        if values:
            out[f"reward/{name}"] = sum(values) / len(values)
    out["reward/judge_failures"] = float(judge_failures)
    return out
