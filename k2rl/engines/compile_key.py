"""One vLLM compile per architecture, not per checkpoint.

vLLM keys its torch.compile cache (and the Inductor cache it moves under it) by its whole config, the
model's path included: every new checkpoint directory (an SFT stage's output, the checkpoint a
resumed run starts from) compiles the same graph again. For k2-mini on an H100 that is 34-45 s of
torch.compile against 4 s from the cache (2026-12-06); on the CPU a copy of k2-tiny at another path
started in 32 s against 17 s from the same path. So the engine starts vLLM from `config_directory`:
a copy of the checkpoint's files other than its weights, named by their contents, with random
weights (vLLM's `load_format="dummy"`), then loads the real weights in place, as it loads the
trainer's after each update. The copy's config names the dtype vLLM runs in, which the engine always
sets itself: checkpoints differ there alone (`k2rl make-model` writes k2-mini in bf16, the trainer's
fp32 master weights in fp32), and `k2rl prewarm` compiles ahead of the job for all of them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def loads_in_place(model_dir: str | Path) -> bool:
    """Whether the engine can start from `config_directory`: not for quantized checkpoints, whose
    weights vLLM takes as stored (k2rl's reader dequantizes them for the trainer)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return "quantization_config" not in config


def config_directory(model_dir: str | Path, root: str | Path, dtype: str) -> Path:
    """`root`/k2rl-model-configs/<hash of the files>: the same path for every checkpoint of the same
    config and tokenizer that vLLM runs in `dtype`. Written once (into a temporary directory, then
    renamed), so engines starting at the same time on one machine read a complete copy, whichever of
    them wrote it."""
    paths = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))
    if not any(p.name == "config.json" for p in paths):
        raise FileNotFoundError(f"no config.json in {model_dir}; expected an HF-layout model directory")
    files = {p.name: p.read_bytes() for p in paths}
    config = json.loads(files["config.json"])
    files["config.json"] = (json.dumps({**config, "dtype": dtype, "torch_dtype": dtype}, indent=2, sort_keys=True)
                            + "\n").encode()
    digest = hashlib.sha256()
    for name, content in files.items():
        digest.update(name.encode() + b"\0" + content + b"\0")
    target = Path(root) / "k2rl-model-configs" / digest.hexdigest()[:16]
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        for name, content in files.items():
            (staging / name).write_bytes(content)
        try:
            os.rename(staging, target)
        except OSError:  # another engine renamed its identical copy first
            shutil.rmtree(staging)
    return target
