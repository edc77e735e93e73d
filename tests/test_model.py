"""Presets, make-model determinism and checkpoint-name export (max logits: test_attention.py)."""
import hashlib
import subprocess
import sys

import pytest
import torch
from transformers import DeepseekV3Config

from k2rl.model.build import make_model
from k2rl.model.checkpoint import load_model
from k2rl.model.modeling import build_model, export_weights, from_checkpoint_names
from k2rl.model.presets import PRESETS, preset_config
from k2rl.validation import ValidationFailed


def _params(name):
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(DeepseekV3Config(**preset_config(name))).parameters())


def test_presets_have_k2_shape():
    k2 = preset_config("k2")
    assert (k2["hidden_size"], k2["num_hidden_layers"], k2["num_attention_heads"], k2["n_routed_experts"]) == (7168, 61, 64, 384)
    assert 1.0e12 < _params("k2") < 1.06e12
    assert 1e9 <= _params("k2-mini") <= 3e9
    assert _params("k2-tiny") < 5e6
    for name in PRESETS:
        cfg = preset_config(name)
        # vLLM-CPU's MLA kernel and K2's router: fixed for every preset.
        assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["topk_method"]) == (512, 64, "noaux_tc")
        assert cfg["first_k_dense_replace"] == 1 and cfg["n_shared_experts"] == 1 and cfg["scoring_func"] == "sigmoid"


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="k2-mini"):
        preset_config("k3")


def test_full_k2_refuses_random_init(tmp_path):
    with pytest.raises(ValidationFailed, match="real checkpoint"):
        make_model("k2", tmp_path)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_make_model_same_seed_same_bytes(tmp_path, tiny_model_dir):
    cli = [sys.executable, "-m", "k2rl.cli", "make-model", "--preset", "k2-tiny", "--seed"]
    subprocess.run(cli + ["0", "--out", str(tmp_path / "a")], check=True, capture_output=True)
    make_model("k2-tiny", tmp_path / "b", seed=1)
    a = _digest(tmp_path / "a")
    assert a == _digest(tiny_model_dir)
    assert set(a) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert a["model.safetensors"] != _digest(tmp_path / "b")["model.safetensors"]


def test_export_uses_per_expert_names_and_round_trips(tiny_model_dir):
    model = load_model(tiny_model_dir)
    exported = dict(export_weights(model))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in exported
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in exported
    assert not any("gate_up_proj" in n for n in exported)
    state = from_checkpoint_names(exported.items())
    for name, tensor in model.state_dict().items():
        if name in state:
            assert torch.equal(state[name], tensor), name
