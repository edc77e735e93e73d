"""`k2rl make-model`: a random-initialised K2-architecture model and its tokenizer, in the HF layout."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import DeepseekV3Config

from k2rl.model.checkpoint import save_model, write_config
from k2rl.model.modeling import build_model
from k2rl.model.presets import preset_config
from k2rl.model.tokenizer import save_tokenizer, train_tokenizer
from k2rl.validation import ValidationFailed

# Beyond this a random init on the host is pointless (and k2 would need ~4 TB of fp32): real-size
# models come from real checkpoints.
MAX_BUILD_PARAMS = 5e9


def make_model(preset: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype | None = None,
               device: str | None = None) -> Path:
    """Build, initialise with `seed`, and save model + tokenizer. Same preset, seed and kind of device
    (default: the GPU when there is one), same bytes. The GPU because torch's CPU normal_ is serial: it
    took ~30 s of k2-mini's build on the host, a second on the GPU."""
    out_dir = Path(out_dir)
    config = DeepseekV3Config(**preset_config(preset))
    params = _parameters(config)
    if params > MAX_BUILD_PARAMS:
        raise ValidationFailed(f"preset {preset!r} has {params / 1e9:.0f} B parameters: too large to initialise "
                         f"randomly here; load a real checkpoint instead (model.path in the config)")
    dtype = dtype or _default_dtype(params)
    with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
        model = build_model(config, dtype=dtype, seed=seed)
    save_model(model, out_dir)
    _save_tokenizer(config, out_dir, seed)
    return out_dir


def write_model_files(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """What `make_model` writes but the weights (config and tokenizer): enough for vLLM to compile the
    model ahead of the job (`k2rl prewarm`), for any preset."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = DeepseekV3Config(**preset_config(preset))
    write_config(config, out_dir, _default_dtype(_parameters(config)))
    _save_tokenizer(config, out_dir, seed)
    return out_dir


def _parameters(config: DeepseekV3Config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(config).parameters())


def _default_dtype(params: int) -> torch.dtype:
    return torch.float32 if params < 1e8 else torch.bfloat16


def _save_tokenizer(config: DeepseekV3Config, out_dir: Path, seed: int) -> None:
    save_tokenizer(train_tokenizer(config.vocab_size, seed=seed), out_dir,
                   model_max_length=config.max_position_embeddings)
