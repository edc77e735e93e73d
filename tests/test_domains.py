"""Built-in domains: enough stateful tools, 1000+ distinct tasks by seed covering every kind, and a
scripted oracle that solves >= 99% of 200 sampled tasks through the live tools, user and checker."""
from __future__ import annotations

import json
import random
import statistics

import pytest

from k2rl.env import load_env
from k2rl.model.chat import ChatTokenizer
from k2rl.rollout import oracle_trajectory

DOMAINS = ["airline", "bank", "calendar", "shop"]


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokenizer(tiny_model_dir)


@pytest.mark.parametrize("name", DOMAINS)
def test_generator_is_large_seeded_and_varied(name):
    env_cls = load_env(name)
    assert len(env_cls.tools) >= 8
    tasks = env_cls.tasks(1000, seed=0)
    keys = {(t.goal, json.dumps(t.initial_state, sort_keys=True)) for t in tasks}
    assert len(keys) == 1000
    assert env_cls.generate(123) == env_cls.generate(123)
    tags = {tag for t in tasks for tag in t.tags}
    assert {"ask", "refuse", "off_topic"} <= tags  # needs user info; impossible or out of scope
    assert sum(len(t.solution) > 2 for t in tasks) > 200  # multi-step


@pytest.mark.parametrize("name", DOMAINS)
def test_oracle_solves_sampled_tasks(name, chat):
    env_cls = load_env(name)
    seeds = random.Random(name).sample(range(10**6), 200)
    trajectories = [oracle_trajectory(env_cls(), env_cls.generate(s), chat) for s in seeds]
    failures = [(t.task_id, t.result) for t in trajectories if not t.success]
    assert len(failures) <= 2, failures
    assert all(t.stats.errors == {} and t.stats.valid_calls == t.stats.tool_calls for t in trajectories)


def test_shop_dialogs_fit_a_tiny_model(chat):
    """The CPU demo SFTs k2-tiny on shop oracle dialogs: they must be short."""
    env_cls = load_env("shop")
    lengths = [len(t.token_ids) - t.prompt_len for t in (oracle_trajectory(env_cls(), task, chat)
                                                          for task in env_cls.tasks(100, seed=5))]
    assert statistics.mean(lengths) < 200 and max(lengths) <= 320
    assert all(len(d["function"]["parameters"].get("properties", {})) <= 2 for d in env_cls.declarations())
