"""Reward combination: weights per part, missing parts, the budget penalty, and the logged metrics."""
from __future__ import annotations

import pytest

from k2rl.config import RewardWeights
from k2rl.rewards import RewardParts, combine, reward_metrics

WEIGHTS = RewardWeights(verifiable=1.0, process=0.5, rubric=0.25, budget=2.0)


def test_weighted_sum_of_parts():
    reward = combine(RewardParts(verifiable=1.0, process=0.5, rubric=0.8), WEIGHTS)
    assert reward.total == pytest.approx(1.0 + 0.25 + 0.2)
    assert reward.components == {"verifiable": 1.0, "process": 0.5, "rubric": 0.8, "budget": 0.0, "format": 0.0}


def test_over_budget_is_penalised_and_missing_parts_add_nothing():
    reward = combine(RewardParts(rubric=0.4, over_budget=True), WEIGHTS)
    assert reward.total == pytest.approx(0.25 * 0.4 - 2.0)
    assert reward.components == {"rubric": 0.4, "budget": -1.0, "format": 0.0}


def test_metrics_average_each_part_over_episodes_that_have_it():
    rewards = [combine(RewardParts(verifiable=1.0, rubric=0.5), WEIGHTS),
               combine(RewardParts(verifiable=0.0, over_budget=True), WEIGHTS)]
    metrics = reward_metrics(rewards, judge_failures=3)
    assert metrics == pytest.approx({"reward/total": (1.125 - 2.0) / 2, "reward/verifiable": 0.5,
                                     "reward/rubric": 0.5, "reward/budget": -0.5, "reward/format": 0.0,
                                     "reward/judge_failures": 3.0})
    assert "reward/process" not in metrics
    assert reward_metrics([], judge_failures=1) == {"reward/judge_failures": 1.0}


def test_broken_calls_cost_their_share():
    reward = combine(RewardParts(verifiable=1.0, broken_calls=0.5), RewardWeights(format=0.5))
    assert reward.components["format"] == -0.5
    assert reward.total == pytest.approx(1.0 - 0.25)


def test_broken_calls_count_malformed_text_unknown_tools_and_bad_arguments():
    from k2rl.env.environment import CheckResult
    from k2rl.rollout.trajectory import EpisodeStats, Trajectory

    def trajectory(**stats):
        return Trajectory(task_id="t", env="e", token_ids=[], loss_mask=[], logprobs=[], prompt_len=0, messages=[],
                          tools=[], result=CheckResult(success=True, score=1.0), stats=EpisodeStats(**stats))

    # 3 parsed calls of which 1 valid, plus 1 malformed call text: 3 of 4 attempts broken
    assert trajectory(tool_calls=3, valid_calls=1, errors={"malformed": 1}).broken_calls == pytest.approx(0.75)
    assert trajectory(tool_calls=2, valid_calls=2).broken_calls == 0.0
    assert trajectory().broken_calls == 0.0  # no call attempted: nothing broken


def test_an_unsolved_action_task_costs_the_same_whatever_the_reply_and_declining_more():
    """A false "done" and silence: -1 each under the defaults; a refusal -1.5, below any attempt (the
    format penalty is at most 0.5)."""
    from k2rl.env.environment import CheckResult
    from k2rl.rollout.trajectory import EpisodeStats, Trajectory

    def episode(reply: str, tags: list[str], success: bool = False):
        return Trajectory(task_id="t", env="e", token_ids=[], loss_mask=[], logprobs=[], prompt_len=0, tools=[],
                          messages=[{"role": "user", "content": "cancel O1"}, {"role": "assistant", "content": reply}],
                          result=CheckResult(success=success, score=float(success)), stats=EpisodeStats(), tags=tags)

    defaults = RewardWeights()
    unsolved = [combine(episode(reply, ["cancel"]).reward_parts(), defaults).total
                for reply in ("Done, O1 is cancelled.", "Hello.", "Sorry, I cannot do that.")]
    assert unsolved == [-1.0, -1.0, -1.5]
    assert unsolved[2] <= -1.0 - defaults.format  # an attempt whose every call broke
    assert combine(episode("Done.", ["cancel"], success=True).reward_parts(), defaults).total == 1.5
    assert combine(episode("Sorry, I cannot.", ["cancel", "refuse"], success=True).reward_parts(), defaults).total == 1.5
