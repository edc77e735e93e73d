"""RolloutEngine on real vLLM (CPU, in-process): sampling contract, sleep/wake state, in-place reload."""
import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from k2rl.engines.rollout import RELOAD_LOGGERS, RolloutEngine
from k2rl.engines.types import Generation, SamplingConfig
from k2rl.model.checkpoint import load_model, read_weights
from k2rl.model.modeling import export_weights, greedy_decode

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [100, 200, 300, 400, 500]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return RolloutEngine(tiny_model_dir, max_model_len=512)


def trainer_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)
    return logp[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None])[:, 0]


def test_generate_shapes_budgets_and_seed(engine):
    sampling = SamplingConfig(temperature=1.0, max_tokens=[3, 5, 7], n=2, seed=11)
    out = engine.generate(PROMPTS, sampling)
    assert [len(per_prompt) for per_prompt in out] == [2, 2, 2]
    for per_prompt, budget in zip(out, [3, 5, 7]):
        for g in per_prompt:
            assert isinstance(g, Generation) and len(g.token_ids) == len(g.logprobs) <= budget
            assert all(lp <= 0 for lp in g.logprobs)
            assert g.finish_reason == "length" or g.token_ids[-1] in (1,)
    assert out == engine.generate(PROMPTS, sampling)  # same seed, same samples
    twice = engine.generate([PROMPTS[0]] * 2, SamplingConfig(max_tokens=8, seed=11))
    assert twice[0][0].token_ids != twice[1][0].token_ids  # a repeated prompt is sampled anew


def test_stop_token_is_last_id(engine):
    first = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0, max_tokens=4))[0][0].token_ids
    stop = first[1]
    g = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0, max_tokens=4, stop_token_ids=[stop]))[0][0]
    assert g.finish_reason == "stop" and g.token_ids == first[:first.index(stop) + 1] and len(g.logprobs) == len(g.token_ids)


def test_asleep_engine_refuses_work(engine):
    engine.sleep()
    assert engine.holds_device_memory() == {"weights": False, "kv_cache": False}
    with pytest.raises(RuntimeError, match="wake"):
        engine.generate(PROMPTS, SamplingConfig(max_tokens=2))
    engine.wake(("weights",))
    with pytest.raises(RuntimeError, match="kv_cache"):
        engine.generate(PROMPTS, SamplingConfig(max_tokens=2))
    engine.wake()
    assert len(engine.generate(PROMPTS, SamplingConfig(max_tokens=2))) == 3


def test_reload_from_streamed_buckets_matches_trainer(engine, tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    buckets = ([pair] for pair in export_weights(model))  # a lazy stream, one tensor per bucket
    engine.load_weights(pair for bucket in buckets for pair in bucket)
    out = engine.generate(PROMPTS, SamplingConfig(temperature=0, max_tokens=8))
    gaps = []
    for prompt, (g,) in zip(PROMPTS, out):
        assert g.token_ids == greedy_decode(model, prompt, len(g.token_ids))
        gaps.append((trainer_logprobs(model, prompt, g.token_ids) - torch.tensor(g.logprobs)).abs())
    assert torch.cat(gaps).max() < 2e-2


def test_reload_warns_of_a_layer_left_out_but_not_of_what_no_checkpoint_holds(engine, tiny_model_dir):
    """vLLM's reload keeps the tensors of a layer the stream did not carry, and warns, per layer and
    then by parameter name. The rotary embedding's cos/sin cache and MLA's absorbed projections are
    computed, in no checkpoint: their warnings, at every sync and start, are dropped. A left-out layer
    that the checkpoint does hold still warns, by its name."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logs = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    for log in logs:
        log.addHandler(handler)
    try:
        weights = dict(read_weights(tiny_model_dir, None))
        engine.load_weights(weights.items())
        whole = [r.getMessage() for r in records]
        engine.load_weights((name, t) for name, t in weights.items() if name != "lm_head.weight")
        partial = [r.getMessage() for r in records][len(whole):]
    finally:
        for log in logs:
            log.removeHandler(handler)
    assert not [m for m in whole if "Failed to load weights" in m or "not loaded" in m], whole
    assert [m for m in partial if "Failed to load weights" in m] == ["ParallelLMHead: Failed to load weights"], partial
    assert [m for m in partial if "not loaded" in m] == [
        "Following weights were not loaded from checkpoint: {'lm_head.weight'}"], partial


def test_routing_replay_on_the_cpu_is_refused_with_the_fix(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("the GPU records routing: tests/test_worker_gpu.py")
    with pytest.raises(ValueError, match=r"rollout.routing_replay=false"):
        RolloutEngine(tiny_model_dir, routing_replay=True)


# A checkpoint's engine start in a process of its own, as a Worker's: an engine started earlier in the
# same process leaves Inductor's global config otherwise than a fresh process has it (vLLM-CPU's
# `cpp.dynamic_threads`), and vLLM's compile key includes that config
START_AND_DECODE = """
import json, sys
from k2rl.config import load_config
from k2rl.engines.rollout import RolloutEngine
from k2rl.engines.types import SamplingConfig
job = load_config(sys.argv[1], [])
engine = RolloutEngine.from_config(sys.argv[2], job.rollout, job.model, job.run.seed)
[[gen]] = engine.generate([json.loads(sys.argv[3])], SamplingConfig(temperature=0.0, max_tokens=6, seed=0))
print(json.dumps({"token_ids": gen.token_ids, "logprobs": gen.logprobs}))
"""


def test_prewarm_compiles_what_a_later_checkpoint_start_reads(tiny_model_dir, tmp_path, monkeypatch):
    """`k2rl prewarm` compiles a job's engine (CUDA graphs' CPU twin: torch.compile) from the preset's
    config alone into rollout.compile_cache_dir, the path a second machine's start would read. A
    checkpoint of that architecture in another directory, its config naming another dtype (the
    trainer's fp32 master weights write k2-mini's so; `k2rl make-model` bf16), then starts without
    compiling, and with its own weights. What a fresh machine's start pays besides: no model-inspection
    subprocess, whose findings vLLM would cache in `modelinfos`."""
    for name in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "elsewhere"))
    cache = tmp_path / "cache"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"model": {"preset": "k2-tiny", "init_seed": 0}, "rollout": {
        "max_model_len": 256, "enforce_eager": False, "compile_cache_dir": str(cache)}}))
    done = subprocess.run([sys.executable, "-m", "k2rl.cli", "prewarm", str(job_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "k2rl prewarm: compiled the rollout engine of k2-tiny" in done.stdout
    compiled = list((cache / "vllm" / "torch_compile_cache").rglob("*"))
    assert any(p.is_file() for p in compiled), f"nothing compiled under {cache}"
    inspected = list((cache / "vllm" / "modelinfos").glob("*"))
    assert not inspected, f"vLLM inspected the model class in a subprocess: {inspected}"

    checkpoint = shutil.copytree(tiny_model_dir, tmp_path / "step_2" / "model")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    done = subprocess.run([sys.executable, "-c", START_AND_DECODE, str(job_file), str(checkpoint), json.dumps(PROMPTS[0])],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    graphs = sorted(p.name for p in (cache / "vllm" / "torch_compile_cache" / "torch_aot_compile").iterdir())
    assert len(graphs) == 1, f"the checkpoint's start compiled anew: {graphs}"
    gen = json.loads(done.stdout.strip().splitlines()[-1])
    expected = trainer_logprobs(load_model(tiny_model_dir), PROMPTS[0], gen["token_ids"])
    assert torch.allclose(torch.tensor(gen["logprobs"]), expected, atol=1e-4)
