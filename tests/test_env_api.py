"""The environment API without a model: declarations, every robustness case of `step`, the
simulated user, task files, the registry and `check`."""
from __future__ import annotations

import json
import time

import pytest

from k2rl.env import Environment, RuleUser, Task, ToolError, load_env, load_tasks, tool
from k2rl.model.template import parse_turn
from k2rl.validation import ValidationFailed


class Lab(Environment):
    """Fault injection: a tool that raises, one that sleeps past its timeout."""

    @tool
    def put(self, key: str, value: int = 0) -> dict:
        """Store a value."""
        self.state[key] = value
        return self.state

    @tool
    def fail(self) -> str:
        """Always raises."""
        raise RuntimeError("disk on fire")

    @tool
    def refuse(self) -> str:
        """An expected failure."""
        raise ToolError("not allowed")

    @tool
    def hang(self) -> str:
        """Sleeps past the time-out."""
        time.sleep(2)
        return "late"


def _call(name, args, idx=0):
    return (f"<|tool_call_begin|>functions.{name}:{idx}<|tool_call_argument_begin|>{args}<|tool_call_end|>")


def _turn(*calls):
    return parse_turn("<|tool_calls_section_begin|>" + "".join(calls) + "<|tool_calls_section_end|>")


@pytest.fixture
def lab():
    env = Lab(tool_timeout_s=0.2)
    env.reset(Task(id="t", goal="store x", expect={"x": 3}, milestones=[{"tool": "put", "args": {"key": "x"}}]))
    return env


def test_declaration_is_k2_tool_declare():
    decl = Lab.declarations()[0]
    assert decl == {"type": "function", "function": {
        "name": "put", "description": "Store a value.",
        "parameters": {"type": "object", "properties": {"key": {"type": "string"},
                                                         "value": {"type": "integer", "default": 0}},
                       "required": ["key"]}}}
    create = next(d for d in load_env("calendar").declarations() if d["function"]["name"] == "create")
    assert "title" in create["function"]["parameters"]["properties"]  # a field named title survives compaction


def test_valid_calls_run_in_order_and_count(lab):
    result = lab.step(_turn(_call("put", '{"key": "x", "value": 3}', 0), _call("put", '{"key": "y"}', 1)))
    assert (result.tool_calls, result.valid_calls, sum(result.errors.values()), result.done) == (2, 2, 0, False)
    assert [o["tool_call_id"] for o in result.observations] == ["functions.put:0", "functions.put:1"]
    assert json.loads(result.observations[1]["content"]) == {"x": 3, "y": 0}
    assert lab.check().success


@pytest.mark.parametrize("turn,kind,message", [
    (_turn(_call("nope", "{}")), "unknown_tool", "unknown tool 'nope'; available tools: put, fail, refuse, hang"),
    (_turn(_call("put", '{"key": ')), "invalid_args", "not valid JSON"),
    (_turn(_call("put", '{"key": "x", "value": "many"}')), "invalid_args", "value: Input should be a valid integer"),
    (_turn(_call("put", '{"key": "x", "colour": 1}')), "invalid_args", "colour: Extra inputs are not permitted"),
    (_turn(_call("fail", "{}")), "tool_exception", "fail failed: RuntimeError: disk on fire"),
    (_turn(_call("hang", "{}")), "tool_timeout", "hang timed out after 0.2s"),
    (parse_turn("<|tool_calls_section_begin|>" + _call("put", '{"key": "x"}')), "malformed", "not closed"),
    (parse_turn("<|tool_calls_section_begin|><|tool_call_begin|>put<|tool_call_argument_begin|>{}<|tool_call_end|>"
                "<|tool_calls_section_end|>"), "malformed", "malformed tool call id"),
])
def test_every_failure_is_an_error_observation(lab, turn, kind, message):
    start = time.perf_counter()
    result = lab.step(turn)
    assert time.perf_counter() - start < 1.5  # the hung tool does not hold the episode
    assert result.errors == {kind: 1} and not result.done
    assert any(message in o["content"] and o["content"].startswith("Error:") for o in result.observations)
    assert lab.step(_turn(_call("put", '{"key": "x", "value": 3}', 1))).valid_calls == 1  # the episode goes on


def test_tool_error_is_a_valid_call_without_error_count(lab):
    result = lab.step(_turn(_call("refuse", "{}")))
    assert (result.valid_calls, dict(result.errors)) == (1, {})
    assert result.observations[0]["content"] == "Error: not allowed"


def test_check_gives_partial_credit_and_unchanged():
    env = Lab()
    env.reset(Task(id="t", goal="g", expect={"x": 1, "gone": None},
                   milestones=[{"tool": "put", "args": {"key": "x"}}, {"tool": "put", "args": {"key": "z"}},
                               {"say": ["done"]}]))
    env.step(_turn(_call("put", '{"key": "x", "value": 1}')))
    env.step(parse_turn("All done."))
    result = env.check()
    assert (result.success, result.state_ok, round(result.score, 3)) == (False, True, 0.667)
    env.reset(Task(id="t", goal="g", unchanged=True, initial_state={"x": 1}))
    env.step(_turn(_call("put", '{"key": "x", "value": 2}')))
    assert not env.check().state_ok


def test_rule_user_answers_questions_confirms_and_ends():
    user = RuleUser()
    assert user.reset(Task(id="t", goal="Cancel it.", user_info={"order id": "O7"}, user_confirms=False)) == "Cancel it."
    assert user.reply("Which order id?") == "My order id is O7."
    assert user.reply("What is the ID of your order?") == "My order id is O7."
    assert user.reply("Shall I proceed?") == "No, please don't do that."
    assert user.reply("Order O7 stays open.") is None
    assert user.reply("What colour?").startswith("I don't know")


def test_text_turn_goes_to_the_user_and_can_end(lab):
    assert lab.step(parse_turn("Done.")).done


def test_task_files_yaml_jsonl_and_located_errors(tmp_path):
    (tmp_path / "ok.jsonl").write_text(json.dumps({"id": "a", "goal": "g"}) + "\n\n" + json.dumps({"id": "b", "goal": "h"}))
    assert [t.id for t in load_tasks(tmp_path / "ok.jsonl")] == ["a", "b"]
    (tmp_path / "bad.yaml").write_text("tasks:\n  - id: a\n    goal: g\n  - id: b\n    gaol: typo\n")
    with pytest.raises(ValidationFailed, match=r"bad.yaml:5: tasks.1.gaol: unknown key"):
        load_tasks(tmp_path / "bad.yaml")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "a", "goal": "g"}) + "\n" + json.dumps({"id": "a"}))
    with pytest.raises(ValidationFailed, match=r"bad.jsonl:2: goal: required field is missing"):
        load_tasks(tmp_path / "bad.jsonl")
    (tmp_path / "dup.yaml").write_text("- {id: a, goal: g}\n- {id: a, goal: h}\n")
    with pytest.raises(ValidationFailed, match="duplicate task id 'a'"):
        load_tasks(tmp_path / "dup.yaml")


def test_registry_builtins_paths_and_errors(tmp_path):
    assert load_env("shop").name == "shop"
    assert load_env("envs.bank:Bank").name == "bank"
    assert load_env("envs.airline").name == "airline"  # the module's only Environment
    (tmp_path / "mine.py").write_text("from k2rl.env import Environment\nclass Mine(Environment):\n    pass\n")
    assert load_env(str(tmp_path / "mine.py")).name == "mine"
    with pytest.raises(ValueError, match="unknown environment 'shopp'; known: airline, bank, calendar, shop"):
        load_env("shopp")
    with pytest.raises(ValueError, match="not a k2rl.env.Environment subclass"):
        load_env("json:dumps")


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A package that declares `[project.entry-points."k2rl.envs"] mine = "mine_pkg:Mine"` (as installed)."""
    (tmp_path / "mine_pkg.py").write_text("from k2rl.env import Environment\nclass Mine(Environment):\n    pass\n")
    dist = tmp_path / "mine_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mine-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[k2rl.envs]\nmine = mine_pkg:Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_env("mine").__name__ == "Mine"
