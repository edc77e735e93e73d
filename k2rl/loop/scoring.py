"""Rewards and advantages for one step's trajectories (K samples per task, adjacent)."""
from __future__ import annotations

import torch

from k2rl.algo import batch_normalized, group_centered, group_normalized
from k2rl.config import AlgorithmConfig, RewardWeights
from k2rl.rewards.combine import Reward, combine, reward_metrics
from k2rl.rewards.scorer import Episode, RubricScorer
from k2rl.rollout.trajectory import Trajectory


def judge_episode(t: Trajectory, goal: str) -> Episode:
    """What the judge sees: the task's goal and the dialog after the tool declarations and system prompt."""
    return Episode(task=goal, id=f"{t.task_id}#{t.sample}", messages=[m for m in t.messages if m["role"] != "system"])


def score(trajectories: list[Trajectory], goals: dict[str, str], samples_per_task: int, weights: RewardWeights,
          judge: RubricScorer | None) -> tuple[list[Reward], dict[str, float]]:
    """One reward per trajectory: verifiable end state, milestone process score, rubric score (when a
    judge is configured; groups of K are compared pairwise if it is), budget and wrong-refusal penalties."""
    rubric_scores: list[float | None] = [None] * len(trajectories)
    judge_metrics: dict[str, float] = {"reward/judge_failures": 0.0}
    if judge is not None:
        groups = [[judge_episode(t, goals[t.task_id]) for t in trajectories[i:i + samples_per_task]]
                  for i in range(0, len(trajectories), samples_per_task)]
        verdicts = judge.score_groups(groups)
        rubric_scores = [s.score for group in verdicts.scores for s in group]
        judge_metrics = verdicts.metrics()
    rewards = [combine(t.reward_parts(rubric), weights) for t, rubric in zip(trajectories, rubric_scores)]
    metrics = reward_metrics(rewards, int(judge_metrics.pop("reward/judge_failures")))
    return rewards, {**metrics, **judge_metrics}


def advantages(rewards: list[Reward], samples_per_task: int, algo: AlgorithmConfig) -> list[float]:
    totals = torch.tensor([r.total for r in rewards]).view(-1, samples_per_task)
    if algo.name == "k2":
        adv = group_centered(totals)
    elif algo.name == "grpo":
        adv = group_normalized(totals)
    else:
        adv = batch_normalized(totals.flatten())
    return adv.flatten().tolist()


def informative_groups(rewards: list[Reward], samples_per_task: int, limit: int) -> list[int]:
    """The first `limit` groups (K adjacent samples of one task) whose rewards differ: DAPO's dynamic
    sampling. A group whose samples all earned the same has zero advantage under any group baseline,
    and in a token-mean loss its tokens only dilute the groups that teach something."""
    totals = torch.tensor([r.total for r in rewards]).view(-1, samples_per_task)
    spread = totals.max(dim=1).values - totals.min(dim=1).values > 1e-6
    return spread.nonzero().flatten().tolist()[:limit]
