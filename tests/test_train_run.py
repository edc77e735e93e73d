"""`k2rl train` end to end on real Ray, DeepSpeed and vLLM (k2-tiny, CPU): the run directory and every
metric, SIGTERM -> checkpoint -> clean exit, and SIGKILL -> --resume reproducing the uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from k2rl.commands import set_arguments

pytestmark = pytest.mark.slow

SMALL = ["algorithm.tasks_per_step=2", "algorithm.samples_per_task=2", "algorithm.max_new_tokens=24",
         "env.max_turns=2", "env.token_budget=48", "env.eval_tasks=4", "logging.progress=false",
         "rollout.max_model_len=1024", "train.micro_batch_tokens=8192"]


def _cmd(out: Path, name: str, model_dir: Path, *extra: str) -> list[str]:
    sets = SMALL + [f"run.output_dir={out}", f"run.name={name}", f"model.path={model_dir}", *extra]
    return [sys.executable, "-m", "k2rl.cli", "train", "configs/tiny-cpu.yaml", *set_arguments(sets)]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


EVERY_STEP = {
    "reward/total", "reward/verifiable", "reward/process", "reward/budget", "reward/wrong_refusal",
    "reward/judge_failures", "rollout/success", "rollout/wrong_refusal", "rollout/tool_calls", "rollout/process_score", "rollout/avg_turns", "rollout/generated_tokens",
    "rollout/truncated_rate", "rollout/tool_call_validity", "rollout/temperature", "rollout/length_tokens",
    "mismatch/logprob_abs", "attn/max_logit", "attn/clipped_heads", "moe/max_load", "moe/idle_experts",
    "train/loss", "train/grad_norm", "train/lr",
    "time/switch", "time/rollout", "time/judge", "time/train", "time/reload", "time/step", "perf/tokens_per_s",
}
# The switch back to vLLM (weights synced) opens the next step: from step 2 on, and in no SFT step.
AFTER_AN_UPDATE = {"time/sync", "time/offload", "time/wake", "sync/gb_per_s"}


def test_short_run_writes_the_whole_run_directory(tiny_model_dir, tmp_path):
    ptx = tmp_path / "ptx.jsonl"  # K2's PTX: next-token loss on curated dialogs mixed into RL batches
    ptx.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                    {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
                           for i in range(3)))
    done = _run(_cmd(tmp_path, "short", tiny_model_dir, "schedule.steps=2", "schedule.eval_every=2",
                     "schedule.checkpoint_every=1", "algorithm.ptx_coef=0.1", f"algorithm.ptx_dataset={ptx}",
                     "algorithm.name=grpo", "algorithm.kl_coef=0.05"))  # the other runs use K2's objective
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "short"
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/success" in rows[0] and "eval/success" in rows[2]
    per_kind = {"eval/wrong_refusal", "eval/tool_calls", "eval/tool_call_validity", "eval/reward"}
    baselines = {f"baseline/{b}/{k}" for b in ("refuse", "nothing", "oracle") for k in ("success", "wrong_refusal")}
    assert per_kind | baselines <= set(rows[0]) and per_kind <= set(rows[2])
    assert rows[0]["baseline/refuse/wrong_refusal"] == 1.0 and rows[0]["baseline/oracle/success"] == 1.0
    for row in rows[1:]:
        assert EVERY_STEP | {"loss/ptx", "loss/kl", "loss/clip_frac", "time/reference"} <= set(row), EVERY_STEP - set(row)
        assert "time/logprobs" not in row  # one update per rollout: the update's forward gives the old logprobs
        assert row["mismatch/logprob_abs"] < 5e-3
    assert AFTER_AN_UPDATE <= set(rows[2])
    assert (run / "config.yaml").exists() and (run / "rollouts" / "step_1.jsonl").exists()
    assert {p.name for p in (run / "plots").iterdir()} >= {"reward.png", "success.png", "kinds.png", "time.png"}
    assert any((run / "tensorboard").iterdir())
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_2" and json.loads((latest / "trainer_state.json").read_text())["step"] == 2
    from k2rl.model.agreement import measure  # the checkpoint is a model vLLM and the trainer both load

    assert measure(latest / "model", prompts=2, tokens=8).mean_abs_gap < 5e-3


@pytest.mark.parametrize("sets, message", [
    (["env.name=shpo"], "error: env.name: unknown environment 'shpo'; known: airline, bank, calendar, shop"),
    (["algorithm.teacher_declines=[refnd]", "algorithm.teacher_decline_rate=0.5"],
     r"error: algorithm.teacher_declines names task types \['refnd'\] that environment 'shop' does not have"),
    (["rewards.judge.mode=endpoint", "rewards.judge.base_url=http://127.0.0.1:9/v1", "rewards.judge.rubric=nope.yaml"],
     "error: rewards.judge.rubric: .*nope.yaml: file not found"),
    (["algorithm.ptx_coef=0.5", "algorithm.ptx_dataset=/nonexistent/sft.jsonl"],
     "error: algorithm.ptx_dataset /nonexistent/sft.jsonl: file not found"),
    (["rollout.max_model_len=64"], "error: rollout.max_model_len is 64, but task shop-0's opening prompt .* is "
                                   r"\d+ tokens, .* raise rollout.max_model_len to at least \d+"),
    (["algorithm.samples_per_task=1"], "error: .*algorithm.samples_per_task is 1: k2's advantage .* set it to 2 or more"),
])
def test_bad_input_fails_before_any_worker_starts(tiny_model_dir, tmp_path, capsys, sets, message):
    """Each input the config names is read before Ray and the workers start (minutes on a GPU), and a
    bad one is one line naming its field, not a traceback from inside the trainer."""
    import re

    import ray

    from k2rl.cli import main

    argv = ["train", "configs/tiny-cpu.yaml", *set_arguments(SMALL + [f"run.output_dir={tmp_path}",
                                                                     f"model.path={tiny_model_dir}", *sets])]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not ray.is_initialized()


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    from k2rl.cli import main

    (tmp_path / "config.yaml").write_text(Path("configs/tiny-cpu.yaml").read_text())  # a run that never checkpointed
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: no complete checkpoint" in capsys.readouterr().err


def test_sigterm_checkpoints_then_exits(tiny_model_dir, tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path, "term", tiny_model_dir, "schedule.steps=50", "schedule.checkpoint_every=0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "term"
    deadline = time.monotonic() + 600
    while not any(r["step"] >= 1 for r in _metrics(run)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped_at = _metrics(run)[-1]["step"]
    assert 1 <= stopped_at < 50
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at}"


def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    steps = ["schedule.steps=3", "schedule.checkpoint_every=1", "workers.num_workers=1",
             "algorithm.ptx_coef=0.5", "algorithm.ptx_dataset=oracle",  # PTX draws training tasks too
             "schedule.final_training_state=false"]
    straight = _run(_cmd(tmp_path, "straight", tiny_model_dir, *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert all(r["loss/ptx"] > 0 for r in _metrics(tmp_path / "straight")[1:])
    checkpoints = tmp_path / "straight" / "checkpoints"  # only the finished run's last one is weights only
    assert (checkpoints / "step_2" / "model" / "deepspeed").is_dir()
    assert not (checkpoints / "step_3" / "model" / "deepspeed").exists()
    finished = _run([sys.executable, "-m", "k2rl.cli", "train", "--resume", str(tmp_path / "straight")])
    assert finished.returncode != 0 and f"model.path={checkpoints / 'step_3' / 'model'}" in finished.stderr

    killed = _killed_after_step_2_then_resumed(tmp_path, tiny_model_dir, steps)
    _assert_same_final_weights(tmp_path / "straight", killed, tiny_model_dir, last_step=3)


def test_killed_sft_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    """SFT makes each step's oracle dialogs while the step before trains (k2rl.loop.ahead): a checkpoint
    keeps the task cursor from before the dialogs made ahead, so the resumed run trains on the same ones."""
    steps = ["schedule.steps=4", "schedule.checkpoint_every=2", "workers.num_workers=1", "algorithm.name=sft",
             "schedule.eval_every=0", "schedule.final_training_state=false"]
    straight = _run(_cmd(tmp_path, "straight", tiny_model_dir, *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert all("time/sft_data" in r for r in _metrics(tmp_path / "straight"))  # the wait for the step's dialogs
    killed = _killed_after_step_2_then_resumed(tmp_path, tiny_model_dir, steps)
    assert ([r["train/loss"] for r in _metrics(killed)] ==
            [r["train/loss"] for r in _metrics(tmp_path / "straight")])
    _assert_same_final_weights(tmp_path / "straight", killed, tiny_model_dir, last_step=4)


def _killed_after_step_2_then_resumed(tmp_path, model_dir, steps) -> Path:
    """The run of `steps` as "killed": SIGKILL once its step-2 checkpoint is complete, then --resume."""
    proc = subprocess.Popen(_cmd(tmp_path, "killed", model_dir, *steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        latest = killed / "checkpoints" / "latest"
        if latest.exists() and latest.read_text().strip() == "step_2":
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_2"
    resumed = _run([sys.executable, "-m", "k2rl.cli", "train", "--resume", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in _metrics(killed)] == [r["step"] for r in _metrics(tmp_path / "straight")]
    return killed


def _assert_same_final_weights(straight: Path, killed: Path, model_dir, last_step: int) -> None:
    final = Path("checkpoints") / f"step_{last_step}" / "model" / "model.safetensors"
    a, b = load_file(str(straight / final)), load_file(str(killed / final))
    assert a.keys() == b.keys()
    init = load_file(str(Path(model_dir) / "model.safetensors"))
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert moved > 0  # training changed the weights...
    for k in a:  # ...and the resumed run changed them the same way
        assert float((a[k] - b[k]).abs().max()) <= 1e-4 * max(1.0, moved), k


def test_group_filter_rolls_out_extra_tasks_and_trains_on_informative_groups(tiny_model_dir, tmp_path):
    """algorithm.filter_groups with oversample 2: twice the tasks rolled out (all saved), at most
    tasks_per_step groups trained on, and only groups whose rewards differ; a step without any makes no
    update (no train/* figures) rather than training on zero advantages (the random tiny model's groups
    all fail alike; tests/test_loop_units.py picks groups from mixed outcomes)."""
    done = _run(_cmd(tmp_path, "filtered", tiny_model_dir, "schedule.steps=2", "schedule.eval_every=0",
                     "algorithm.filter_groups=true", "algorithm.oversample=2", "algorithm.temperature.start=1.5",
                     "algorithm.task_sampling=prioritized"))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "filtered"
    state = json.loads((run / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    weights = {k for k in _metrics(run)[-1] if k.startswith("tasks/weight/")}
    assert weights == {f"tasks/weight/{t}" for t in state["type_success"]} != set()  # a resumed run goes on from these
    for row in _metrics(run)[1:]:
        saved = [json.loads(line) for line in (run / "rollouts" / f"step_{row['step'] - 1}.jsonl").read_text().splitlines()]
        assert len(saved) == 4 * 2  # 2 tasks x oversample 2, 2 samples each
        groups = {}
        for t in saved:
            groups.setdefault(t["task_id"], set()).add(round(t["reward"], 6))
        informative = sum(len(rewards) > 1 for rewards in groups.values())
        assert row["rollout/groups_trained"] == min(informative, 2)
        assert row["rollout/informative_groups"] == informative
        assert ("train/loss" in row) == (informative > 0)
