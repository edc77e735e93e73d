"""What one episode produces: exact token ids with a loss mask and rollout logprobs, the dialog as
messages, the verifiable check result and the episode's stats. The RL loop computes rewards from it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from k2rl.env.environment import CheckResult
from k2rl.env.kinds import Kind, reads_as_refusal, task_kind
from k2rl.rewards.combine import RewardParts


@dataclass
class EpisodeStats:
    turns: int = 0  # assistant generations
    tool_calls: int = 0
    valid_calls: int = 0  # known tool, valid arguments
    errors: dict[str, int] = field(default_factory=dict)  # kind (k2rl.env.ERROR_KINDS) -> count
    generated_tokens: int = 0
    truncated: bool = False  # the last generation was cut off (budget, context or per-turn limit)
    end_reason: str = ""  # done | max_turns | budget | context | turn_length | env_error | oracle_exhausted
    env_error: str | None = None  # the env failed (reset/step/check raised or timed out); the trajectory
    # then ends before the turn whose step failed
    env_time_s: float = 0.0


@dataclass
class Trajectory:
    """`token_ids` = prompt (tools, system, user, generation prompt) then, per turn, the generated ids
    (loss_mask 1, `logprobs` from the rollout engine) and the observation ids (loss_mask 0: rendered
    tool/user messages plus the next generation prompt). Nothing in it was re-tokenized from text."""

    task_id: str
    env: str
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]  # per token; 0.0 where loss_mask is 0
    prompt_len: int
    messages: list[dict]
    tools: list[dict]
    result: CheckResult
    stats: EpisodeStats
    rubric: str | dict | None = None
    sample: int = 0  # index among the samples of the same task
    tags: list[str] = field(default_factory=list)  # the task's tags: its kind survives in episode files
    # vLLM's experts per position of token_ids from the last generation (routing replay; not saved)
    routed_experts: torch.Tensor | None = field(default=None, repr=False)

    @property
    def success(self) -> bool:
        return self.result.success

    @property
    def kind(self) -> Kind:
        return task_kind(self.tags)

    @property
    def final_reply(self) -> str:
        """The last assistant message's text ("" when there is none)."""
        replies = [m.get("content") or "" for m in self.messages if m["role"] == "assistant"]
        return replies[-1] if replies else ""

    @property
    def unsolved(self) -> bool:
        """A task that needed action, left undone."""
        return self.kind == "action" and not self.success

    @property
    def wrong_refusal(self) -> bool:
        """An action task left undone whose final assistant reply reads as a refusal."""
        return self.unsolved and reads_as_refusal(self.final_reply)

    @property
    def score(self) -> float:
        return self.result.score

    def reward_parts(self, rubric: float | None = None) -> RewardParts:
        """What the reward combines for this episode (the rubric score comes from the judge, if any)."""
        return RewardParts(verifiable=float(self.success), process=self.score, rubric=rubric,
                           over_budget=self.stats.end_reason == "budget",
                           unsolved=self.unsolved, wrong_refusal=self.wrong_refusal,
                           broken_calls=self.broken_calls)

    @property
    def broken_calls(self) -> float:
        """Share of attempted calls that failed to be calls: malformed call text (counted once per error),
        unknown tools and invalid arguments, over all calls attempted; 0 without any."""
        malformed = self.stats.errors.get("malformed", 0)
        attempts = self.stats.tool_calls + malformed
        return (attempts - self.stats.valid_calls) / attempts if attempts else 0.0

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "routed_experts"}

    @classmethod
    def from_dict(cls, data: dict) -> Trajectory:
        data = dict(data, result=CheckResult(**data["result"]), stats=EpisodeStats(**data["stats"]))
        return cls(**data)
