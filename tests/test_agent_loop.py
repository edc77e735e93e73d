"""The agent loop on real vLLM (k2-tiny, CPU): token-exact trajectories, budgets, and environments
that fail in reset, step or check (fault injection) without stopping the run."""
from __future__ import annotations

import time
from itertools import groupby

import pytest

from k2rl.engines.rollout import RolloutEngine
from k2rl.engines.types import SamplingConfig
from k2rl.env import Environment, Task, load_env, tool
from k2rl.model.chat import ChatTokenizer
from k2rl.model.template import GENERATION_PROMPT, render_message
from k2rl.rollout import Limits, oracle_trajectory, run_episodes


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return RolloutEngine(tiny_model_dir, max_model_len=2048, seed=0)


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokenizer(tiny_model_dir)


def _runs(trajectory):
    """(mask, ids) for each maximal run of equal loss-mask values after the prompt."""
    pairs = list(zip(trajectory.loss_mask, trajectory.token_ids))[trajectory.prompt_len:]
    return [(mask, [i for _, i in run]) for mask, run in groupby(pairs, key=lambda p: p[0])]


class Chatty:
    """A simulated user that always answers."""

    def reset(self, task):
        return task.opening

    def reply(self, assistant_text):
        return "Go on, please."


def _rebuild(t, chat):
    generated = iter(ids for mask, ids in _runs(t) if mask == 1)
    ids = chat.encode_tools(t.tools)
    for m in t.messages:
        ids += chat.generation_prompt() + next(generated) if m["role"] == "assistant" else chat.encode_message(m)
    return ids


def test_rollouts_are_token_exact(engine, chat):
    shop = load_env("shop")
    tasks = shop.tasks(3, seed=1)
    limits = Limits(max_turns=3, max_new_tokens=24, token_budget=60)
    # a third of the vocabulary stops a turn and the user always answers: random-model dialogs of several turns
    sampling = SamplingConfig(temperature=1.0, stop_token_ids=chat.stop_ids + list(range(100, chat.vocab_size, 3)))
    trajectories = run_episodes(engine, chat, lambda: shop(user=Chatty()), tasks, sampling=sampling, limits=limits,
                                samples_per_task=2)
    assert sum(t.stats.turns >= 2 for t in trajectories) >= 2
    assert [t.task_id for t in trajectories] == [t.id for t in tasks for _ in range(2)]
    for t in trajectories:
        n = len(t.token_ids)
        assert len(t.loss_mask) == len(t.logprobs) == n
        opening = [m for m in t.messages if m["role"] in ("system", "user")][:2]
        assert t.token_ids[:t.prompt_len] == chat.encode_conversation(opening, t.tools, add_generation_prompt=True)
        assert sum(t.loss_mask) == t.stats.generated_tokens <= limits.token_budget
        assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if m == 0)
        assert all(lp <= 0.0 for lp in t.logprobs) and any(lp < 0.0 for lp in t.logprobs)
        # the ids are exactly: template ids of every non-assistant message, generated ids for each turn
        rebuilt = _rebuild(t, chat)
        assert t.token_ids in (rebuilt, rebuilt + chat.generation_prompt())
        assert t.stats.turns == sum(mask for mask, _ in _runs(t)) <= 3
        assert t.stats.end_reason in ("max_turns", "budget", "turn_length")
        assert t.stats.truncated == (t.stats.end_reason in ("budget", "turn_length"))


def test_budget_truncates_and_flags(engine, chat):
    shop = load_env("shop")
    task = shop.generate(7).model_copy(update={"token_budget": 10})
    [t] = run_episodes(engine, chat, shop, [task], sampling=SamplingConfig(temperature=1.0, seed=3),
                       limits=Limits(max_new_tokens=64))
    assert (t.stats.generated_tokens, t.stats.truncated, t.stats.end_reason) == (10, True, "budget")
    assert not t.success and t.result.error is None


def test_oracle_trajectory_is_the_template_rendering(chat):
    """Re-rendering the dialog through the template gives the same ids; the mask covers exactly the
    assistant turns (without their `<|im_assistant|>assistant<|im_middle|>` header)."""
    for name in ("shop", "airline"):
        env_cls = load_env(name)
        for task in env_cls.tasks(20, seed=3):
            t = oracle_trajectory(env_cls(), task, chat)
            assert t.token_ids == chat.encode_conversation(t.messages, t.tools)
            generated = [ids for mask, ids in _runs(t) if mask == 1]
            assistant = [m for m in t.messages if m["role"] == "assistant"]
            assert generated == [chat.encode(render_message(m)[len(GENERATION_PROMPT):]) for m in assistant]
            indices = [c["id"].rsplit(":", 1)[1] for m in assistant for c in m.get("tool_calls", [])]
            assert indices == [str(i) for i in range(len(indices))]  # functions.NAME:IDX counts over the dialog


class Faulty(Environment):
    """Fault injection: the task's initial_state says where this environment breaks."""

    @tool
    def noop(self) -> str:
        """Does nothing."""
        return "ok"

    def reset(self, task):
        if task.initial_state.get("fault") == "reset":
            raise KeyError("missing fixture")
        return super().reset(task)

    def step(self, turn):
        if self.task.initial_state.get("fault") == "step":
            time.sleep(3)
        return super().step(turn)

    def check(self):
        if self.task.initial_state.get("fault") == "check":
            raise ZeroDivisionError("bad checker")
        return super().check()


def test_failing_environments_fail_only_their_episode(engine, chat):
    tasks = [Task(id=fault or "healthy", goal="hi", initial_state={"fault": fault})
             for fault in ("reset", "step", "check", None)]
    # every id is a stop id: each turn is one token that ends with "stop", so every env gets stepped
    sampling = SamplingConfig(temperature=1.0, seed=0, stop_token_ids=list(range(chat.vocab_size)))
    start = time.perf_counter()
    trajectories = run_episodes(engine, chat, Faulty, tasks, sampling=sampling,
                                limits=Limits(max_turns=2, max_new_tokens=16, step_timeout_s=1.0))
    assert time.perf_counter() - start < 60
    by_id = {t.task_id: t for t in trajectories}
    assert by_id["reset"].token_ids == [] and "reset raised KeyError: 'missing fixture'" in by_id["reset"].result.error
    assert by_id["step"].result.error == "environment step exceeded 1s" and by_id["step"].stats.turns == 0
    assert "check raised ZeroDivisionError: bad checker" in by_id["check"].result.error
    assert by_id["healthy"].result.error is None and by_id["healthy"].stats.end_reason == "done"
    assert all(not t.success for t in trajectories if t.task_id != "healthy")


def test_llm_user_speaks_through_the_policy_engine(engine, chat):
    """The LLM-simulated user on a real engine (here the policy itself, via the self-critique backend)."""
    from k2rl.env import LLMUser
    from k2rl.rewards.self_critique import SelfCritiqueBackend

    backend = SelfCritiqueBackend(engine, chat)
    shop = load_env("shop")
    sampling = SamplingConfig(temperature=1.0, seed=0, stop_token_ids=list(range(chat.vocab_size)))
    # sampled, not greedy: a random model's greedy reply can be blank, which ends the dialog by design
    user = lambda: LLMUser(backend, max_tokens=8, temperature=1.0)
    [t] = run_episodes(engine, chat, lambda: shop(user=user()), shop.tasks(1, seed=2), sampling=sampling,
                       limits=Limits(max_turns=3))
    replies = [m for m in t.messages[2:] if m["role"] == "user"]
    assert t.stats.turns == 3 and len(replies) == 3 and all(r["content"] for r in replies)
    assert backend.stats.requests == 3
