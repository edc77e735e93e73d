"""`k2rl eval` on k2-tiny with an environment that lives outside the repo (the README example copied
into a temporary directory), plugged in by module path and by file path."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from k2rl.cli import main
from k2rl.engines.world import free_port

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
    assert "error: env.name: unknown environment 'nope'" in capsys.readouterr().err


def test_eval_names_a_server_that_does_not_answer(tiny_model_dir, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    assert main(["eval", "--model", url, "--env", "shop", "--tasks", "1", "--tokenizer", str(tiny_model_dir),
                 "--quiet"]) == 2
    assert "no OpenAI-compatible server answers there" in capsys.readouterr().err


def test_eval_baseline_needs_a_tokenizer(capsys):
    assert main(["eval", "--env", "shop", "--baseline", "refuse", "--tasks", "1"]) == 2
    assert "error: --baseline/--oracle needs --tokenizer DIR" in capsys.readouterr().err


def test_judge_names_a_missing_input(tmp_path, capsys):
    missing = tmp_path / "episodes.jsonl"
    assert main(["judge", "--input", str(missing), "--rubric", "tool_use", "--endpoint", "http://127.0.0.1:9/v1"]) == 2
    assert f"error: --input {missing}: file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_against_an_openai_compatible_server(tiny_model_dir, tmp_path):
    """vLLM's OpenAI server on k2-tiny: ids and logprobs come back exactly over HTTP."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
         "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes",
         str(256 << 20), "--attention-backend", "CPU_MLA", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "vLLM server did not come up"
                time.sleep(2)
        out = tmp_path / "endpoint.jsonl"
        assert main(["eval", "--env", "shop", "--model", url, "--tasks", "2", "--max-new-tokens", "16",
                     "--set", "env.max_turns=2", "--out", str(out), "--quiet"]) == 0
        for e in _episodes(out):
            generated = [lp for lp, m in zip(e["logprobs"], e["loss_mask"]) if m]
            assert len(generated) == e["stats"]["generated_tokens"] > 0 and all(lp < 0 for lp in generated)
    finally:
        server.terminate()
        server.wait(timeout=60)
