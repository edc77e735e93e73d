"""Reading and writing models in the HF checkpoint layout that vLLM and the trainer both load."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from k2rl.model import fp8
from k2rl.model.modeling import MAX_LOGIT_ATTENTION, build_model, export_weights, from_checkpoint_names

SHARD_BYTES = 4 << 30


def write_config(config: DeepseekV3Config, out_dir: Path, dtype: torch.dtype) -> None:
    data = config.to_dict()
    data.pop("_attn_implementation_autoset", None)
    data.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                dtype=str(dtype).removeprefix("torch."), torch_dtype=str(dtype).removeprefix("torch."))
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_weights(named: Iterable[tuple[str, torch.Tensor]], out_dir: Path) -> None:
    """Safetensors shards (with an index when there are several), in the order given: same input, same bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2) + "\n")


def save_model(model: torch.nn.Module, out_dir: str | Path) -> None:
    """config.json + safetensors in checkpoint names (per-expert), loadable by vLLM."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    write_config(model.config, out_dir, dtype)
    save_weights(export_weights(model), out_dir)


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}; is this a model directory?")
    return files


def read_weights(model_dir: str | Path, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream checkpoint tensors, floats in `dtype` (None: as stored); FP8 block-scaled weights are
    dequantized (to bf16 where `dtype` is None), scales dropped."""
    for path in _weight_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for name in sorted(names):
                if name.endswith(fp8.SCALE_SUFFIX):
                    continue
                tensor = f.get_tensor(name)
                if name + fp8.SCALE_SUFFIX in names:
                    tensor = fp8.dequantize(tensor, f.get_tensor(name + fp8.SCALE_SUFFIX), dtype or torch.bfloat16)
                elif dtype is not None and tensor.is_floating_point() and not name.endswith("e_score_correction_bias"):
                    tensor = tensor.to(dtype)
                yield name, tensor


def load_config(model_dir: str | Path) -> DeepseekV3Config:
    data = json.loads((Path(model_dir) / "config.json").read_text())
    data.pop("quantization_config", None)  # we dequantize on load
    data["model_type"] = "deepseek_v3"
    config = DeepseekV3Config(**{k: v for k, v in data.items() if k not in ("architectures", "auto_map")})
    config._attn_implementation = MAX_LOGIT_ATTENTION
    return config


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The trainer model from a checkpoint directory (bf16/fp32, or FP8 block-scaled, dequantized)."""
    config = load_config(model_dir)
    with torch.device("meta"):
        model = build_model(config, dtype)
    state = from_checkpoint_names(read_weights(model_dir, dtype))
    state = {k: v for k, v in state.items() if not k.startswith(f"model.layers.{config.num_hidden_layers}.")}  # MTP
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {model_dir} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.model.rotary_emb = DeepseekV3RotaryEmbedding(config)  # buffers not in checkpoints: recompute
    return model
