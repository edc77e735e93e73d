"""The config-only directory vLLM starts from (k2rl.engines.compile_key): one per config and tokenizer,
whatever the checkpoint's path; the engine test of the compile it saves is in test_rollout_engine.py."""
import json
import shutil

import pytest

from k2rl.engines.compile_key import config_directory, loads_in_place


def test_checkpoints_of_one_config_share_a_directory_without_weights(tiny_model_dir, tmp_path):
    other = shutil.copytree(tiny_model_dir, tmp_path / "run" / "checkpoints" / "step_7" / "model")
    first = config_directory(tiny_model_dir, tmp_path / "cache", "float32")
    assert config_directory(other, tmp_path / "cache", "float32") == first
    assert json.loads((first / "config.json").read_text()) == json.loads((tiny_model_dir / "config.json").read_text())
    assert (first / "tokenizer.json").exists()
    assert not list(first.glob("*.safetensors*"))
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial copies left behind


def test_the_copy_names_the_engine_dtype_whatever_the_checkpoint_stored(tiny_model_dir, tmp_path):
    """`k2rl make-model` writes k2-mini in bf16, the trainer's checkpoints in fp32 (its master weights):
    vLLM runs both in the job's dtype, and compiles once for them."""
    bf16 = shutil.copytree(tiny_model_dir, tmp_path / "bf16")
    config = json.loads((bf16 / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    copy = config_directory(bf16, tmp_path / "cache", "float32")
    assert copy == config_directory(tiny_model_dir, tmp_path / "cache", "float32")
    assert json.loads((copy / "config.json").read_text())["torch_dtype"] == "float32"
    as_bf16 = config_directory(tiny_model_dir, tmp_path / "cache", "bfloat16")
    assert as_bf16 != copy and json.loads((as_bf16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_another_config_or_tokenizer_gets_its_own(tiny_model_dir, tmp_path):
    first = config_directory(tiny_model_dir, tmp_path / "cache", "float32")
    changed = shutil.copytree(tiny_model_dir, tmp_path / "changed")
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    assert config_directory(changed, tmp_path / "cache", "float32") != first
    retokenized = shutil.copytree(tiny_model_dir, tmp_path / "retokenized")
    (retokenized / "tokenizer_config.json").write_text("{}")
    others = (first, config_directory(changed, tmp_path / "cache", "float32"))
    assert config_directory(retokenized, tmp_path / "cache", "float32") not in others


def test_quantized_checkpoints_load_as_stored(tiny_model_dir, tmp_path):
    assert loads_in_place(tiny_model_dir)
    fp8 = shutil.copytree(tiny_model_dir, tmp_path / "fp8")
    config = json.loads((fp8 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    assert not loads_in_place(fp8)


def test_a_directory_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        config_directory(tmp_path, tmp_path / "cache", "float32")


def test_prewarm_names_the_setting_it_cannot_take(tmp_path, capsys):
    from k2rl.cli import main

    job = tmp_path / "job.yaml"
    job.write_text("rollout:\n  tensor_parallel_size: 2\n")
    assert main(["prewarm", str(job)]) == 2
    assert "rollout.tensor_parallel_size=1" in capsys.readouterr().err
    job.write_text(f"model:\n  path: {tmp_path}\n")
    assert main(["prewarm", str(job)]) == 2
    assert f"model.path {tmp_path}: no config.json there" in capsys.readouterr().err
