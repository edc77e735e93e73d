"""`k2rl eval`'s per-kind figures: a hand-made episode file with known answers, summarised through the
CLI entry, and a baseline run whose written episodes keep their task kind."""
from __future__ import annotations

import json

import pytest

from k2rl.cli import main
from k2rl.commands import set_arguments


def _episode(task_id, tags, success, score, final, calls=0, valid=0, end="done"):
    messages = [{"role": "user", "content": "please do it"}, {"role": "assistant", "content": final}]
    return {"task_id": task_id, "env": "shop", "token_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "logprobs": [0, 0, 0],
            "prompt_len": 1, "messages": messages, "tools": [], "tags": tags,
            "result": {"success": success, "score": score, "state_ok": success, "milestones": {}, "error": None},
            "stats": {"turns": 1, "tool_calls": calls, "valid_calls": valid, "errors": {}, "generated_tokens": 2,
                      "truncated": end == "budget", "end_reason": end, "env_error": None, "env_time_s": 0.0}}


EPISODES = [  # reward under verifiable 1, process 0.5, budget 1, unsolved 1, wrong_refusal 0.5, format 0.5
    _episode("a1", ["buy"], True, 1.0, "Done.", calls=2, valid=2),  # 1 + 0.5 = 1.5
    _episode("a2", ["buy"], False, 0.0, "Sorry, I can't do that."),  # unsolved, wrong refusal: -1.5
    _episode("a3", ["cancel"], False, 0.5, "All set!", calls=1, valid=0, end="budget"),  # 0.25 - 1 - 1 - 0.5 = -2.25
    _episode("a4", ["cancel"], True, 1.0, "Sorry for the wait: done.", calls=1, valid=1),  # done: no refusal, 1.5
    _episode("r1", ["sold_out", "refuse"], True, 1.0, "Sorry, I cannot."),  # 1.5
    _episode("r2", ["sold_out", "refuse"], False, 0.0, "Cancelled it.", calls=1, valid=1),  # 0
]


def test_per_kind_figures_of_a_hand_made_episode_file(tmp_path, capsys):
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EPISODES))
    summary_path = tmp_path / "summary.json"
    weights = ["rewards.weights.verifiable=1", "rewards.weights.process=0.5", "rewards.weights.budget=1",
               "rewards.weights.unsolved=1", "rewards.weights.wrong_refusal=0.5", "rewards.weights.format=0.5"]
    assert main(["eval", "--episodes", str(path), "--summary", str(summary_path),
                 *set_arguments(weights)]) == 0
    s = json.loads(summary_path.read_text())["hand"]
    assert (s["episodes"], s["action_episodes"], s["refuse_episodes"]) == (6, 4, 2)
    assert s["success_rate"] == pytest.approx(3 / 6)
    assert s["success_action"] == pytest.approx(2 / 4) and s["success_refuse"] == pytest.approx(1 / 2)
    assert s["wrong_refusal"] == pytest.approx(1 / 4)
    assert s["tool_calls_per_episode"] == pytest.approx(5 / 6) and s["tool_call_validity"] == pytest.approx(4 / 5)
    assert s["reward"] == pytest.approx((1.5 - 1.5 - 2.25 + 1.5 + 1.5 + 0) / 6)
    assert s["success_by_tag"] == {"buy": 0.5, "cancel": 0.5, "refuse": 0.5, "sold_out": 0.5}
    table = capsys.readouterr().out
    for row in ("success_action", "success_refuse", "wrong_refusal", "tool_calls/episode", "reward"):
        assert row in table


def test_pass_at_k_and_mixed_groups_with_several_samples(tmp_path, capsys):
    """Three samples per task: pass@k counts a task any of whose samples succeeded, `mixed` one whose
    samples disagree (the only groups that give RL a signal)."""
    outcomes = {"b1": ([True, False, False], ["buy"]), "b2": ([False, False, False], ["buy"]),
                "c1": ([True, True, True], ["cancel"]), "r1": ([False, True, False], ["sold_out", "refuse"])}
    lines = []
    for task_id, (successes, tags) in outcomes.items():
        for sample, ok in enumerate(successes):
            episode = _episode(task_id, tags, ok, float(ok), "Done." if ok else "Hm.")
            lines.append(json.dumps({**episode, "sample": sample}) + "\n")
    path, summary_path = tmp_path / "samples.jsonl", tmp_path / "summary.json"
    path.write_text("".join(lines))
    assert main(["eval", "--episodes", str(path), "--summary", str(summary_path)]) == 0
    s = json.loads(summary_path.read_text())["samples"]
    assert s["samples_per_task"] == 3
    assert s["pass_at_k_action"] == pytest.approx(2 / 3) and s["mixed_action"] == pytest.approx(1 / 3)
    assert s["pass_at_k_by_tag"] == {"buy": 0.5, "cancel": 1.0, "refuse": 1.0, "sold_out": 1.0}
    assert s["mixed_by_tag"] == {"buy": 0.5, "cancel": 0.0, "refuse": 1.0, "sold_out": 1.0}
    table = capsys.readouterr().out
    assert "pass@k_action" in table and "mixed/buy" in table


def test_one_sample_per_task_reports_no_pass_at_k(tmp_path):
    path, summary_path = tmp_path / "hand.jsonl", tmp_path / "summary.json"
    path.write_text("".join(json.dumps(e) + "\n" for e in EPISODES))
    assert main(["eval", "--episodes", str(path), "--summary", str(summary_path)]) == 0
    assert "pass_at_k_action" not in json.loads(summary_path.read_text())["hand"]


def test_baseline_episodes_keep_their_kind(tiny_model_dir, tmp_path, capsys):
    out, summary_path = tmp_path / "refuse.jsonl", tmp_path / "summary.json"
    assert main(["eval", "--env", "shop", "--baseline", "refuse", "--tokenizer", str(tiny_model_dir), "--tasks", "40",
                 "--out", str(out), "--summary", str(summary_path), "--quiet"]) == 0
    ran = json.loads(summary_path.read_text())["refuse"]
    assert ran["success_action"] == 0.0 and ran["wrong_refusal"] == 1.0
    # it declines off-topic requests rightly; a sold-out item or shipped order needs a look-up first
    episodes = [json.loads(line) for line in out.read_text().splitlines()]
    refused = [e for e in episodes if "refuse" in e["tags"]]
    assert {e["tags"][0] for e in refused} == {"off_topic", "sold_out", "cancel_shipped"}
    assert all(e["result"]["success"] == (e["tags"][0] == "off_topic") for e in refused)
    assert main(["eval", "--episodes", str(out), "--summary", str(summary_path)]) == 0
    reread = json.loads(summary_path.read_text())["refuse"]
    assert {k: reread[k] for k in ran} == ran


def test_episodes_file_errors_name_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EPISODES[0]) + "\n" + json.dumps({"task_id": "x"}) + "\n")
    assert main(["eval", "--episodes", str(path)]) == 2
    assert f"{path}:2: not an episode written by k2rl eval" in capsys.readouterr().err
