"""The model-free baselines on every built-in domain, through the real agent loop, environments and
rule user: declining or doing nothing passes no task that needs action, and under the default reward
weights neither earns anywhere near the scripted oracle (issue 11: the demo's gain was a refusal policy)."""
from __future__ import annotations

import pytest

from k2rl.config import RewardWeights
from k2rl.env import Milestone, load_env
from k2rl.model.chat import ChatTokenizer
from k2rl.rollout import run_baseline, summarize

DOMAINS = ["airline", "bank", "calendar", "shop"]


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokenizer(tiny_model_dir)


@pytest.mark.parametrize("name", DOMAINS)
def test_no_action_task_passes_without_a_tool_call(name, chat):
    env_cls = load_env(name)
    tasks = env_cls.tasks(300, seed=11)
    kinds = {t.id: t.kind for t in tasks}
    assert 30 < sum(k == "refuse" for k in kinds.values()) < 150  # both kinds are well represented
    refusals = run_baseline("refuse", chat, env_cls, tasks)
    nothing = run_baseline("nothing", chat, env_cls, tasks)
    for t in refusals + nothing:
        assert t.stats.tool_calls == 0 and t.stats.env_error is None and t.kind == kinds[t.task_id]
    # blanket refusal passes exactly the refuse tasks whose decline needs no look-up (off-topic requests),
    # and each of its action episodes is a wrong refusal
    blind = {t.id: t.kind == "refuse" and not any(turn.calls for turn in t.solution) for t in tasks}
    assert 0 < sum(blind.values()) < sum(k == "refuse" for k in kinds.values())
    assert [t.success for t in refusals] == [blind[t.task_id] for t in refusals]
    assert all(t.wrong_refusal == (t.kind == "action") for t in refusals)
    # a neutral reply passes nothing: a refuse task needs the refusal, an action task the action
    passed = [(t.task_id, t.tags) for t in nothing if t.success]
    assert passed == []
    assert not any(t.wrong_refusal for t in nothing)


@pytest.mark.parametrize("name", DOMAINS)
def test_default_reward_pays_the_oracle_far_more_than_refusing_or_doing_nothing(name, chat):
    env_cls = load_env(name)
    tasks = env_cls.tasks(200, seed=12)
    weights = RewardWeights()
    reward = {b: summarize(run_baseline(b, chat, env_cls, tasks), weights)["reward"]
              for b in ("refuse", "nothing", "oracle")}
    assert reward["oracle"] > 1.2, reward
    assert reward["refuse"] <= 0.1 and reward["nothing"] <= 0.1, reward
    assert reward["oracle"] - max(reward["refuse"], reward["nothing"]) >= 1.0, reward


def test_declined_cancellation_needs_the_question(chat):
    """A user's "no" only counts when the assistant asked: the airline tasks the user declines."""
    env_cls = load_env("airline")
    declined = [t for t in env_cls.tasks(200, seed=0) if "declined" in t.tags]
    assert declined
    oracle = run_baseline("oracle", chat, env_cls, declined)
    hello = run_baseline("nothing", chat, env_cls, declined)
    assert all(t.success and t.result.milestones for t in oracle)
    assert not any(t.success for t in hello)
    assert all(not any(t.result.milestones.values()) for t in hello)


def test_a_milestone_has_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of"):
        Milestone(say=["sorry"], ask=["proceed?"])


def test_a_decline_that_depends_on_the_world_must_follow_the_look_up(chat):
    """Shop: a sold-out item or a shipped order is declined after looking it up (the oracle); the same
    words without the look-up are right by accident and fail."""
    env_cls = load_env("shop")
    grounded = [t for t in env_cls.tasks(200, seed=3) if t.kind == "refuse" and any(turn.calls for turn in t.solution)]
    assert {"sold_out", "cancel_shipped"} <= {t.tags[0] for t in grounded}
    oracle = run_baseline("oracle", chat, env_cls, grounded)
    assert all(t.success for t in oracle)
    refusals = run_baseline("refuse", chat, env_cls, grounded)
    assert not any(t.success for t in refusals)
    for t in refusals:  # the decline itself was right, the look-up was missing
        said = {label: hit for label, hit in t.result.milestones.items() if label.startswith("say:")}
        assert list(said.values()) == [True] and not all(t.result.milestones.values())
