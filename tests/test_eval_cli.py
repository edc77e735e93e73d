"""`k2rl eval` on k2-tiny with an environment that lives outside the repo (the README example copied
into a temporary directory), plugged in by module path and by file path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from k2rl.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _plugin_dir(tmp_path):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    for name in ("todo_env.py", "todo_tasks.yaml"):
        shutil.copy(EXAMPLES / name, plugin / name)
    return plugin


def _episodes(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_eval_plugin_env_by_module_path_on_k2_tiny(tiny_model_dir, tmp_path, monkeypatch, capsys):
    plugin = _plugin_dir(tmp_path)
    monkeypatch.syspath_prepend(str(plugin))
    out = tmp_path / "eval.jsonl"
    code = main(["eval", "--env", "todo_env:TodoEnv", "--model", str(tiny_model_dir), "--tasks", "3",
                 "--samples", "2", "--temperature", "1", "--max-new-tokens", "32", "--set", "env.max_turns=2",
                 "--out", str(out), "--quiet"])
    assert code == 0
    episodes = _episodes(out)
    assert len(episodes) == 6 and {e["env"] for e in episodes} == {"todo"}
    for e in episodes:
        assert len(e["token_ids"]) == len(e["loss_mask"]) == len(e["logprobs"])
        assert e["tools"][0]["function"]["name"] == "list_todos"
        assert e["stats"]["turns"] >= 1 and e["result"]["error"] is None
    report = capsys.readouterr().out
    for metric in ("success_rate", "process_score", "avg_turns", "tool_call_validity", "episodes written to"):
        assert metric in report


def test_eval_oracle_by_file_path(tiny_model_dir, tmp_path, capsys):
    plugin = _plugin_dir(tmp_path)
    out = tmp_path / "oracle.jsonl"
    assert main(["eval", "--env", f"{plugin}/todo_env.py:TodoEnv", "--oracle", "--tokenizer", str(tiny_model_dir),
                 "--out", str(out), "--quiet"]) == 0
    episodes = _episodes(out)
    assert len(episodes) == 4 and all(e["result"]["success"] for e in episodes)
    assert "success_rate" in capsys.readouterr().out


def test_eval_reports_bad_env_name(capsys):
    assert main(["eval", "--env", "nope", "--oracle", "--tokenizer", "x"]) == 2
    assert "unknown environment 'nope'" in capsys.readouterr().err
