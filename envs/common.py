"""What every built-in domain shares: seeded task generation from scenarios, the reference-solution
vocabulary the scripted oracle replays, and the refusal and out-of-scope patterns.

A scenario is a function `(rng, state) -> dict of Task fields`. It may edit the freshly generated world
`state` (say, mark an order delivered) before that becomes the task's initial state, and it writes the
reference `solution` next to the `expect`ed end state, so the oracle and the checker are independent:
the oracle only replays calls through the live tools, the checker only reads the resulting state.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, ClassVar

from k2rl.env import Environment, Milestone, SolutionCall, SolutionTurn, Task, ToolError
from k2rl.env.kinds import REFUSAL_WORDS, REFUSE_TAG
from k2rl.env.user import CONFIRM_WORDS

OFF_TOPIC = [
    "What will the weather be like tomorrow?", "Write me a poem about the sea.", "Which stocks should I buy?",
    "Can you fix my laptop's wifi?", "Tell me a joke about cats.", "Translate 'good morning' into Japanese.",
    "What is the capital of Australia?", "Can you order me a pizza?", "Help me with my chemistry homework.",
    "Book me a haircut for Friday.",
]

Scenario = Callable[[random.Random, dict], dict[str, Any]]


def call(tool_name: str, /, **args) -> SolutionCall:
    return SolutionCall(name=tool_name, args=args)


def calls(*items: SolutionCall, say: str = "") -> SolutionTurn:
    """One assistant turn making these calls (in order)."""
    return SolutionTurn(say=say, calls=list(items))


def say(text: str) -> SolutionTurn:
    return SolutionTurn(say=text)


def ask(key: str) -> SolutionTurn:
    """The question that makes the simulated user give `key` (a `user_info` phrase)."""
    return say(f"Sure. What is your {key}?")


def milestone(tool_name: str, /, **args) -> Milestone:
    return Milestone(tool=tool_name, args=args)


def said(*words: str) -> Milestone:
    return Milestone(say=list(words))


def asked_to_confirm() -> Milestone:
    """The assistant asked the user to confirm (in the words the rule user answers)."""
    return Milestone(ask=list(CONFIRM_WORDS))


def refuse(reason: str, *before: SolutionTurn) -> dict[str, Any]:
    """Task fields for a request that must be declined (after optional look-ups): nothing may change.
    A decline that depends on the world (a sold-out item, a shipped order) must follow the look-ups that
    show it, so a blanket refusal that happens to be right does not pass."""
    lookups = [milestone(c.name, **c.args) for turn in before for c in turn.calls]
    return dict(solution=[*before, say(f"Sorry, {reason}")], unchanged=True,
                milestones=[*lookups, said(*REFUSAL_WORDS)], tags=[REFUSE_TAG])


def off_topic(rng: random.Random, state: dict) -> dict[str, Any]:
    """A request outside the domain."""
    return dict(goal=rng.choice(OFF_TOPIC), **refuse("I can't help with that here."))


def fresh_id(rng: random.Random, prefix: str, taken, low: int = 100, high: int = 999) -> str:
    while True:
        candidate = f"{prefix}{rng.randint(low, high)}"
        if candidate not in taken:
            return candidate


class Domain(Environment):
    """A built-in domain: `world(rng)` builds a random state, `scenarios` turn it into tasks."""

    scenarios: ClassVar[tuple[Scenario, ...]] = ()
    off_topic_share: ClassVar[float] = 0.05

    @classmethod
    def world(cls, rng: random.Random) -> dict:
        raise NotImplementedError

    def record(self, collection: str, key: str) -> dict:
        """`state[collection][key]`, or a ToolError the model can read."""
        if key not in self.state[collection]:
            raise ToolError(f"no {collection.rstrip('s')} {key}")
        return self.state[collection][key]

    def new_id(self, prefix: str) -> str:
        """Ids of created records come from the state's counter, so generators can predict them."""
        self.state["next"] += 1
        return f"{prefix}{self.state['next'] - 1}"

    @classmethod
    def generate(cls, seed: int) -> Task:
        """The task for one seed: same seed, same task."""
        rng = random.Random(f"{cls.name}:{seed}")
        state = cls.world(rng)
        scenario = off_topic if rng.random() < cls.off_topic_share else rng.choice(cls.scenarios)
        fields = scenario(rng, state)
        fields["tags"] = [scenario.__name__, *fields.get("tags", [])]
        return Task(id=f"{cls.name}-{seed}", initial_state=state, **fields)

    @classmethod
    def tasks(cls, count: int, seed: int = 0) -> list[Task]:
        return [cls.generate(seed + i) for i in range(count)]
