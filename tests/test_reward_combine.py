"""Reward combination: weights per part, missing parts, the budget penalty, and the logged metrics."""
from __future__ import annotations

import pytest

from k2rl.config import RewardWeights
from k2rl.rewards import RewardParts, combine, reward_metrics

WEIGHTS = RewardWeights(verifiable=1.0, process=0.5, rubric=0.25, budget=2.0)


def test_weighted_sum_of_parts():
    reward = combine(RewardParts(verifiable=1.0, process=0.5, rubric=0.8), WEIGHTS)
    assert reward.total == pytest.approx(1.0 + 0.25 + 0.2)
    assert reward.components == {"verifiable": 1.0, "process": 0.5, "rubric": 0.8, "budget": 0.0}


def test_over_budget_is_penalised_and_missing_parts_add_nothing():
    reward = combine(RewardParts(rubric=0.4, over_budget=True), WEIGHTS)
    assert reward.total == pytest.approx(0.25 * 0.4 - 2.0)
    assert reward.components == {"rubric": 0.4, "budget": -1.0}


def test_metrics_average_each_part_over_episodes_that_have_it():
    rewards = [combine(RewardParts(verifiable=1.0, rubric=0.5), WEIGHTS),
               combine(RewardParts(verifiable=0.0, over_budget=True), WEIGHTS)]
    metrics = reward_metrics(rewards, judge_failures=3)
    assert metrics == pytest.approx({"reward/total": (1.125 - 2.0) / 2, "reward/verifiable": 0.5,
                                     "reward/rubric": 0.5, "reward/budget": -0.5, "reward/judge_failures": 3.0})
    assert "reward/process" not in metrics
    assert reward_metrics([], judge_failures=1) == {"reward/judge_failures": 1.0}
