"""`k2rl synth` end to end against the real vLLM server of k2-tiny (structured outputs: the content
is noise, the pipeline is real): killed mid-stage and resumed without redoing finished items, then
the synthesized pool served by the synthetic environment under `k2rl eval`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import yaml

from k2rl.loop.data import load_sft_file
from k2rl.model.chat import ChatTokenizer
from k2rl.synth.config import load_synth_config
from k2rl.synth.pipeline import run_pipeline

STAGES = ("apps", "tool_batches", "agents", "tasks", "trajectories", "verdicts")


def _config(tmp_path, base_url, tokenizer) -> str:
    config = {"out_dir": "out", "workers": 3, "progress": False, "llm": {"base_url": base_url, "concurrency": 3},
              "tools": {"domains": [{"name": "retail", "description": "Online shops: orders and returns."}],
                        "apps_per_domain": 1, "tools_per_app": 2, "max_params": 2},
              "agents": {"count": 1, "min_tools": 2, "max_tools": 2},
              "tasks": {"per_agent": 2, "difficulties": ["single_call", "multi_step"]},
              "trajectories": {"max_agent_turns": 1, "max_user_turns": 1, "user_max_tokens": 24,
                               "failures": {"error": 0.3, "partial": 0.3, "edge_case": 0.2}},
              "filter": {"rubric": "core", "threshold": 0.0, "reason_chars": 24},
              "output": {"tokenizer": str(tokenizer)}}
    path = tmp_path / "synth.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []


def test_synth_killed_mid_stage_resumes_then_serves_eval(tmp_path, vllm_server, tiny_model_dir):
    path = _config(tmp_path, vllm_server, tiny_model_dir)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "k2rl.cli", "synth", path, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _ids(out / "tasks.jsonl") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    before = {stage: (out / f"{stage}.jsonl").read_text().splitlines() if (out / f"{stage}.jsonl").exists() else []
              for stage in STAGES}
    assert 1 <= len(before["tasks"]) < 2, "the kill should land inside the tasks stage"

    report = run_pipeline(load_synth_config(path))
    for stage in STAGES:  # nothing redone: every earlier line kept as written, each id once
        lines = (out / f"{stage}.jsonl").read_text().splitlines()
        assert lines[:len(before[stage])] == before[stage], stage
        assert max(Counter(_ids(out / f"{stage}.jsonl")).values()) == 1, stage
    assert report["stages"]["tasks"]["resumed"] == len(before["tasks"])
    assert report["stages"]["agents"]["resumed"] == 1
    n = report["stages"]["trajectories"]["records"]
    assert n >= 1 and report["filter"]["judged"] == n and report["filter"]["passed"] == n  # threshold 0
    assert report["diversity"]["tools_per_agent"]["min"] >= 1  # as many as the catalog had, up to 2
    assert report["outputs"]["sft_examples"] == n

    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert all(m["role"] in ("system", "user", "assistant", "tool") for row in sft for m in row["messages"])
    examples = load_sft_file(out / "sft.jsonl", ChatTokenizer(tiny_model_dir))
    assert all(len(ids) == len(mask) and any(mask) for ids, mask in examples)

    env = {**os.environ, "K2RL_SYNTH_POOL": str(out / "task_pool.jsonl"), "K2RL_SYNTH_URL": vllm_server}
    result = subprocess.run([sys.executable, "-m", "k2rl.cli", "eval", "--env", "envs.synthetic", "--model",
                             str(tiny_model_dir), "--tasks", "1", "--quiet", "--max-new-tokens", "32",
                             "--set", "env.tool_timeout_s=120", "--out", str(tmp_path / "eval.jsonl")],
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    episode = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])
    assert episode["task_id"] in {e["task"]["id"] for e in map(json.loads, (out / "task_pool.jsonl").read_text().splitlines())}
