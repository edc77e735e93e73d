"""RubricScorer: rubric scores for episodes from any chat backend (an HTTP judge or the policy itself).

Pointwise: each episode is graded alone, 0-10 per criterion. Pairwise (K2's critic): every pair of
the K responses to one task is compared per criterion; a response's criterion score is its win rate
(ties count half). Either way a score is the weighted mean over criteria in [0, 1]. When the judge
fails for good, the episode gets the configured default and the failure is counted, never raised.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from pydantic import BaseModel

from k2rl.llm import ChatBackend, ChatRequest, Completion, LLMFailure, content_key
from k2rl.rewards.fencing import fence
from k2rl.rewards.rubric import RUBRICS_DIR, Criterion, Rubric
from k2rl.rewards.verdict import SCORE_MAX, verdict_model

PROMPTS_DIR = RUBRICS_DIR / "prompts"


class Episode(BaseModel):
    """What the judge sees of one rollout: the task, the transcript, and the task's own criteria."""

    task: str
    messages: list[dict]
    id: str | None = None
    criteria: list[Criterion] = []


@dataclass
class RubricScore:
    score: float  # weighted mean of criteria, in [0, 1]
    criteria: dict[str, float] = field(default_factory=dict)  # per criterion, in [0, 1]
    reasons: dict[str, str] = field(default_factory=dict)
    failed: bool = False  # no judge verdict: `score` is the configured default


@dataclass
class JudgeBatch:
    scores: list[list[RubricScore]]  # same shape as the groups passed in
    calls: int
    failures: int
    cache_hits: int

    def metrics(self) -> dict[str, float]:
        return {"reward/judge_failures": self.failures, "judge/calls": self.calls,
                "judge/cache_hits": self.cache_hits}


@dataclass(frozen=True)
class _Call:
    request: ChatRequest
    rubric: Rubric
    targets: tuple[tuple[int, int], ...]  # (group, episode) this verdict is about: one, or A then B


class RubricScorer:
    def __init__(self, backend: ChatBackend, rubric: Rubric, *, pairwise: bool = False, default_score: float = 0.0,
                 reason_chars: int = 200, temperature: float = 0.0, prompts_dir: str | Path = PROMPTS_DIR):
        self.backend, self.rubric, self.pairwise = backend, rubric, pairwise
        self.default_score, self.reason_chars, self.temperature = default_score, reason_chars, temperature
        self._templates = {mode: Template((Path(prompts_dir) / f"{mode}.txt").read_text())
                           for mode in ("pointwise", "pairwise")}

    def score_groups(self, groups: list[list[Episode]]) -> JudgeBatch:
        """Scores for each group of responses to one task; pairwise within a group when configured
        (a group of one is scored pointwise, so `[[e] for e in episodes]` scores a flat list).
        All judge calls of the batch run concurrently."""
        calls = []
        for g, group in enumerate(groups):
            if self.pairwise and len(group) > 1:
                calls += [self._pair_call(group, g, i, j) for i, j in itertools.combinations(range(len(group)), 2)]
            else:
                calls += [self._point_call(episode, (g, e)) for e, episode in enumerate(group)]
        results = self.backend.complete_many([c.request for c in calls])
        tallies: dict[tuple[int, int], dict[str, list]] = {}
        reasons: dict[tuple[int, int], dict[str, str]] = {}
        for call, result in zip(calls, results):
            if isinstance(result, LLMFailure):
                continue
            for slot, per_criterion in self._read(call, result).items():
                for cid, (value, reason) in per_criterion.items():
                    tallies.setdefault(slot, {}).setdefault(cid, []).append(value)
                    reasons.setdefault(slot, {}).setdefault(cid, reason)
        scores = [[self._total(groups[g][e], tallies.get((g, e)), reasons.get((g, e), {}))
                   for e in range(len(groups[g]))] for g in range(len(groups))]
        failures = sum(isinstance(r, LLMFailure) for r in results)
        hits = sum(isinstance(r, Completion) and r.cached for r in results)
        return JudgeBatch(scores, calls=len(calls), failures=failures, cache_hits=hits)

    def messages(self, mode: str, rubric: Rubric, payload: dict) -> list[dict]:
        """The judge conversation: rubric and fence markers in the system prompt, data in the user turn."""
        fenced = fence(payload)
        lines = "\n".join(f"- {c.id} (weight {c.weight:g}): {c.description}" for c in rubric.criteria)
        system = self._templates[mode].substitute(rubric_name=rubric.name, criteria=lines, begin=fenced.begin,
                                                  end=fenced.end, reason_chars=self.reason_chars)
        return [{"role": "system", "content": system},
                {"role": "user", "content": f"Here is the data to judge.\n{fenced.block}"}]

    def _request(self, mode: str, rubric: Rubric, payload: dict) -> ChatRequest:
        ids = tuple(c.id for c in rubric.criteria)
        max_tokens = 16 + len(ids) * (self.reason_chars + 32)  # a reason may take a token per character
        return ChatRequest(self.messages(mode, rubric, payload), verdict_model(ids, self.reason_chars, mode == "pairwise"),
                           max_tokens=max_tokens, temperature=self.temperature)

    def _point_call(self, episode: Episode, slot: tuple[int, int]) -> _Call:
        rubric = self.rubric.with_criteria(episode.criteria)
        payload = {"task": episode.task, "transcript": episode.messages}
        return _Call(self._request("pointwise", rubric, payload), rubric, (slot,))

    def _pair_call(self, group: list[Episode], g: int, i: int, j: int) -> _Call:
        # Which response is shown first is fixed by content (balanced over pairs, cache-stable).
        if int(content_key([group[i].messages, group[j].messages])[0], 16) % 2:
            i, j = j, i
        rubric = self.rubric.with_criteria(group[i].criteria)
        payload = {"task": group[i].task, "response_A": group[i].messages, "response_B": group[j].messages}
        return _Call(self._request("pairwise", rubric, payload), rubric, ((g, i), (g, j)))

    @staticmethod
    def _read(call: _Call, result: Completion) -> dict[tuple[int, int], dict[str, tuple[float, str]]]:
        """Per target episode, per criterion: (value in [0, 1], reason)."""
        verdict = result.value
        if len(call.targets) == 1:
            return {call.targets[0]: {c.id: (getattr(verdict, c.id).score / SCORE_MAX, getattr(verdict, c.id).reason)
                                      for c in call.rubric.criteria}}
        a, b = call.targets
        out = {a: {}, b: {}}
        for c in call.rubric.criteria:
            item = getattr(verdict, c.id)
            win_a = {"A": 1.0, "B": 0.0, "tie": 0.5}[item.preferred]
            out[a][c.id], out[b][c.id] = (win_a, item.reason), (1.0 - win_a, item.reason)
        return out

    def _total(self, episode: Episode, tally: dict[str, list] | None, reasons: dict[str, str]) -> RubricScore:
        if not tally:
            return RubricScore(self.default_score, failed=True)
        criteria = {cid: sum(v) / len(v) for cid, v in tally.items()}
        weights = {c.id: c.weight for c in self.rubric.with_criteria(episode.criteria).criteria}
        total = sum(weights[cid] * s for cid, s in criteria.items()) / sum(weights[cid] for cid in criteria)
        return RubricScore(total, criteria, reasons)
