"""The imperfect teacher of the demo's cold start (`algorithm.teacher_declines`): its dialogs decline a
fixed share of the named task types and solve everything else, through the real shop environment."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from k2rl.config import AlgorithmConfig, EnvConfig
from k2rl.env import load_env
from k2rl.env.factory import EnvFactory
from k2rl.env.kinds import task_type
from k2rl.loop.tasks import check_task_types
from k2rl.model.chat import ChatTokenizer
from k2rl.rollout import oracle_trajectory, run_baseline, teacher_declines

TYPES = ["refund", "cancel", "cancel_ask"]


def test_the_teacher_declines_its_share_of_the_named_types_and_nothing_else(tiny_model_dir):
    chat = ChatTokenizer(tiny_model_dir)
    env_cls = load_env("shop")
    tasks = env_cls.tasks(400, seed=5)
    declined = [t for t in tasks if teacher_declines(t, TYPES, 0.6)]
    named = [t for t in tasks if task_type(t.tags) in TYPES]
    assert all(task_type(t.tags) in TYPES for t in declined)
    assert 0.45 < len(declined) / len(named) < 0.75
    assert declined == [t for t in tasks if teacher_declines(t, TYPES, 0.6)]  # a fixed draw per task
    assert not any(teacher_declines(t, TYPES, 0.0) for t in tasks)
    for task in declined[:10]:
        dialog = oracle_trajectory(env_cls(), task, chat, decline=True)
        assert not dialog.success and dialog.wrong_refusal and dialog.stats.tool_calls == 0
        solved = oracle_trajectory(env_cls(), task, chat)
        assert solved.success and solved.stats.tool_calls > 0
    # the teacher as a baseline (baseline/teacher in a run's eval): it fails exactly the tasks it declines
    teacher = run_baseline("oracle", chat, env_cls, tasks[:120], declines=lambda t: teacher_declines(t, TYPES, 0.6))
    assert [not t.success for t in teacher] == [teacher_declines(t, TYPES, 0.6) for t in tasks[:120]]


def test_teacher_types_and_rate_go_together():
    with pytest.raises(ValidationError, match="teacher_declines and algorithm.teacher_decline_rate"):
        AlgorithmConfig(teacher_declines=["refund"])
    with pytest.raises(ValidationError, match="teacher_declines and algorithm.teacher_decline_rate"):
        AlgorithmConfig(teacher_decline_rate=0.5)


def test_a_misspelt_teacher_type_is_an_error_that_lists_the_real_ones():
    factory = EnvFactory(EnvConfig(name="shop"))
    check_task_types(factory, 0, TYPES, "algorithm.teacher_declines")
    with pytest.raises(ValueError, match=r"algorithm.teacher_declines names task types \['refunds'\].*'refund'"):
        check_task_types(factory, 0, ["refunds", "cancel"], "algorithm.teacher_declines")
