"""Loading a block-scaled FP8 checkpoint (as K2 and DeepSeek-V3 ship) by dequantizing on load."""
import json
import shutil

import torch
from safetensors.torch import save_file

from k2rl.model import fp8
from k2rl.model.checkpoint import load_model, read_weights


def test_dequantize_inverts_quantize_within_e4m3_precision():
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 200)  # columns of very different scale; partial edge blocks
    q, scale_inv = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2)
    back = fp8.dequantize(q, scale_inv, torch.float32)
    block_max = w.abs().max()
    assert (back - w).abs().max() <= 0.07 * block_max  # e4m3 has a 3-bit mantissa: <= 2^-4 relative to the block max


def test_fp8_checkpoint_loads_dequantized(tiny_model_dir, tmp_path):
    fp8_dir = tmp_path / "fp8"
    shutil.copytree(tiny_model_dir, fp8_dir)
    reference = dict(read_weights(tiny_model_dir, torch.float32))
    tensors = {}
    for name, w in reference.items():
        if w.dim() == 2 and "proj" in name:  # K2 quantizes the linear layers, not norms/embeddings/router
            tensors[name], tensors[name + "_scale_inv"] = fp8.quantize(w)
        else:
            tensors[name] = w.to(torch.bfloat16) if w.is_floating_point() and "bias" not in name else w
    (fp8_dir / "model.safetensors").unlink()
    save_file(tensors, str(fp8_dir / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(config))

    model = load_model(fp8_dir, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    loaded = dict(read_weights(fp8_dir, torch.bfloat16))
    assert not any(n.endswith("_scale_inv") for n in loaded)
    w = reference["model.layers.1.self_attn.q_b_proj.weight"]
    assert (loaded["model.layers.1.self_attn.q_b_proj.weight"].float() - w).abs().max() <= 0.07 * w.abs().max()
    ids = torch.randint(0, 4000, (1, 12))
    with torch.no_grad():
        ref_logits = load_model(tiny_model_dir)(ids).logits
        fp8_logits = model(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(ref_logits.flatten(), fp8_logits.flatten(), dim=0) > 0.99
