"""Simulated users for multi-turn tasks.

The user speaks whenever the assistant answers in text (no tool calls); returning None ends the
episode. `RuleUser` is deterministic and free (default, used in CI and for oracle dialogs);
`LLMUser` plays the task's persona through any OpenAI-compatible chat endpoint.
"""
from __future__ import annotations

import re
from typing import Protocol

from k2rl.env.task import Task
from k2rl.llm.base import ChatBackend, ChatRequest, LLMFailure

CONFIRM_WORDS = ["confirm", "proceed", "go ahead", "shall i", "should i"]  # a question with one asks to confirm
_CONFIRM = re.compile(rf"\b({'|'.join(CONFIRM_WORDS)})\b")


class User(Protocol):
    def reset(self, task: Task) -> str:
        """Start a dialog; returns the opening message."""

    def reply(self, assistant_text: str) -> str | None:
        """The user's answer to an assistant message, or None when the user has nothing more to say."""


class RuleUser:
    """Answers questions only: gives a fact from `task.user_info` when the assistant asks for it by name,
    confirms or declines when asked to confirm (`task.user_confirms`); a message without a question
    ends the dialog."""

    def __init__(self, max_unanswered: int = 2):
        self.max_unanswered = max_unanswered

    def reset(self, task: Task) -> str:
        self.task, self.unanswered = task, 0
        return task.opening

    def reply(self, assistant_text: str) -> str | None:
        text = assistant_text.lower().replace("_", " ")
        if "?" not in text:
            return None
        facts = [f"My {key} is {value}." for key, value in self.task.user_info.items() if _mentions(text, key)]
        if facts:
            return " ".join(facts)
        if _CONFIRM.search(text):
            return "Yes, please go ahead." if self.task.user_confirms else "No, please don't do that."
        if self.unanswered < self.max_unanswered:
            self.unanswered += 1
            return "I don't know. Please just do what I asked."
        return None


def _mentions(text: str, key: str) -> bool:
    words = key.lower().replace("_", " ").split()
    return " ".join(words) in text or all(re.search(rf"\b{re.escape(w)}\b", text) for w in words)


STOP = "###STOP###"

_PROMPT = """You are role-playing a customer talking to an assistant. Stay in character; be brief.
Your goal: {goal}
Persona: {persona}
Facts you know and may give only when asked: {facts}
{confirm}
When your goal is met, or the assistant cannot help, reply with exactly {stop}."""


class LLMUser:
    """A persona-driven user played by an LLM (`k2rl.llm` backend: retries, cache, failure counting).
    A failed call ends the dialog instead of stalling the episode. Environments step in parallel
    threads, so the backend must be thread-safe: `LLMClient` is; an in-process engine is not."""

    def __init__(self, backend: ChatBackend, max_tokens: int = 128, temperature: float = 0.0):
        self.backend, self.max_tokens, self.temperature = backend, max_tokens, temperature

    def reset(self, task: Task) -> str:
        facts = "; ".join(f"{k}: {v}" for k, v in task.user_info.items()) or "none"
        confirm = "If asked to confirm, agree." if task.user_confirms else "If asked to confirm, decline."
        system = _PROMPT.format(goal=task.goal, persona=task.persona or "an ordinary customer", facts=facts,
                                confirm=confirm, stop=STOP)
        # Roles are flipped: the simulator speaks as "assistant", the agent's words arrive as "user".
        self.history = [{"role": "system", "content": system}, {"role": "assistant", "content": task.opening}]
        return task.opening

    def reply(self, assistant_text: str) -> str | None:
        self.history.append({"role": "user", "content": assistant_text})
        result = self.backend.complete_many([ChatRequest(self.history, max_tokens=self.max_tokens,
                                                         temperature=self.temperature)])[0]
        if isinstance(result, LLMFailure) or STOP in result.text or not result.text.strip():
            return None
        self.history.append({"role": "assistant", "content": result.text.strip()})
        return result.text.strip()
