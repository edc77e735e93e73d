"""Shared fixtures: a k2-tiny model built once per test session, and the environment the real
vLLM (CPU, in-process) and DeepSpeed (CPU, gloo) need; `nll`, a loss for TrainEngine.train_step."""
from __future__ import annotations

import os

import pytest
import torch

from k2rl.engines.world import free_port, single_rank_world

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def nll(new_logprobs, batch):
    """Mean negative logprob over loss tokens: the simplest loss with the TrainEngine's contract
    (`from conftest import nll`). Not for Ray actors, which cannot import this module (test_worker has its own)."""
    mask = torch.cat(batch.loss_mask).float()
    return -(torch.cat(new_logprobs) * mask).sum() / mask.sum(), {"tokens": float(mask.sum())}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run on the device machine (see README, GPU tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random k2-tiny model + tokenizer (seed 0) in the HF layout; read-only for tests."""
    from k2rl.model.build import make_model

    return make_model("k2-tiny", tmp_path_factory.mktemp("k2-tiny"), seed=0)


@pytest.fixture(scope="session")
def gpu_model_dir(tiny_model_dir, tmp_path_factory):
    """k2-tiny with K2's own MLA head sizes (qk_nope 128, v 128): vLLM's GPU MLA prefill kernels take
    no smaller ones (k2-tiny's 32 fail with "No valid MLA prefill backend")."""
    import shutil

    from transformers import DeepseekV3Config

    from k2rl.model.checkpoint import save_model
    from k2rl.model.modeling import build_model
    from k2rl.model.presets import preset_config

    out = tmp_path_factory.mktemp("k2-tiny-gpu")
    config = DeepseekV3Config(**dict(preset_config("k2-tiny"), qk_nope_head_dim=128, v_head_dim=128))
    save_model(build_model(config, seed=0), out)
    for f in tiny_model_dir.glob("*token*"):
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, tmp_path_factory):
    """vLLM's OpenAI-compatible server for k2-tiny on a free loopback port; yields its base_url
    (`http://127.0.0.1:PORT/v1`, model name = the model directory). One per test session (~45 s start).

    Compact JSON (`disable_any_whitespace`): under a JSON-schema grammar a random model otherwise
    spends its whole token budget on whitespace between keys."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
           "--kv-cache-memory-bytes", str(256 << 20), "--attention-backend", "CPU_MLA",
           "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM server not ready after 240 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def world_of_one():
    """The torch.distributed environment of a single-rank DeepSpeed world on a free loopback port."""
    _no_process_group()
    single_rank_world()
    yield
    _no_process_group()


def _no_process_group() -> None:
    """Drop any torch.distributed group (and DeepSpeed's handle on it) an earlier module left in this
    process: an in-process vLLM engine's teardown destroys the default group whenever the garbage
    collector reaches it, which broke a later module's DeepSpeed world that had reused that group."""
    import deepspeed.comm
    import deepspeed.utils.groups
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except ValueError:  # vLLM already tore it down and unregistered it: only the default handle is left
            dist.distributed_c10d._update_default_pg(None)
    deepspeed.comm.cdb = None
    deepspeed.utils.groups._WORLD_GROUP = None  # DeepSpeed caches the world group it first saw
