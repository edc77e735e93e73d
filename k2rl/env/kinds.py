"""Task kinds, one definition for eval, rewards and baselines: a task tagged "refuse" is a *refuse*
task (declining is the right answer), every other task is an *action* task (it needs the tools).

Refusal scores are only honest when split by kind: a policy that declines everything passes every
refuse task (a quarter of a built-in domain's mix) while doing nothing useful.
"""
from __future__ import annotations

from typing import Literal

REFUSE_TAG = "refuse"
Kind = Literal["action", "refuse"]
KINDS: tuple[Kind, ...] = ("action", "refuse")

# Words that make a reply read as a refusal (case-insensitive substrings). The built-in domains' refuse
# tasks require one of them in the final reply; the same list decides what a wrong refusal is.
REFUSAL_WORDS = ["sorry", "cannot", "can't", "unable"]


def task_kind(tags: list[str]) -> Kind:
    return "refuse" if REFUSE_TAG in tags else "action"


def task_type(tags: list[str]) -> str:
    """A task's type (its scenario: buy_one, status, ...), finer than its kind: the first tag, "-" if none."""
    return tags[0] if tags else "-"


def reads_as_refusal(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in REFUSAL_WORDS)
