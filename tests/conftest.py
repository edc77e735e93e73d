"""Shared fixtures: a k2-tiny model built once per test session, and the environment the real
vLLM (CPU, in-process) and DeepSpeed (CPU, gloo) need."""
from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "cuda")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch


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
