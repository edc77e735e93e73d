"""Job config: defaults validate, YAML + --set overrides apply, bad input fails with a located message."""
from pathlib import Path

import pytest

from k2rl.config import dump_config, load_config
from k2rl.validation import ValidationFailed


def test_default_demo_config_loads():
    config = load_config("configs/tiny-cpu.yaml")
    assert config.model.preset == "k2-tiny" and config.workers.num_workers == 2


def test_overrides_parse_as_yaml_values():
    config = load_config(None, ["optimizer.lr=3e-4", "workers.num_workers=1", "rewards.judge.mode=off",
                                "optimizer.betas=[0.9, 0.99]"])
    assert config.optimizer.lr == 3e-4 and config.workers.num_workers == 1 and config.optimizer.betas == (0.9, 0.99)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["algorithm.name=grpo"])
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


BAD = [
    ("optimizer:\n  nmae: adamw\n", ":2: optimizer.nmae: unknown key (did you mean 'name'?)"),
    ("optimizer:\n  lr: -1\n", ":2: optimizer.lr: Input should be greater than 0 (got -1)"),
    ("algorithm:\n  name: dpo\n", ":2: algorithm.name: Input should be 'k2', 'grpo', 'ppo' or 'sft' (got 'dpo')"),
    ("train:\n  zero_stage: 4\n", ":2: train.zero_stage: Input should be 0, 1, 2 or 3 (got 4)"),
    ("wokers:\n  num_workers: 2\n", ":1: wokers: unknown key (did you mean 'workers'?)"),
    ("rewards:\n  judge:\n    mode: endpoint\n", ":2: rewards.judge: Value error, judge.mode 'endpoint' needs judge.base_url"),
    ("algorithm:\n  ptx_coef: 0.1\n", "algorithm: Value error, ptx_coef > 0 needs algorithm.ptx_dataset"),
    ("algorithm:\n  kl_coef: 0.1\n", "algorithm: Value error, kl_coef applies to grpo and ppo; 'k2' has none"),
    ("model:\n  dtype: fp16\n", ":2: model.dtype: Input should be 'float32' or 'bfloat16' (got 'fp16')"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("run: [unclosed\n", ":2: invalid YAML"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_config_names_file_line_key_and_fix(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ValidationFailed) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_bad_override_is_named():
    with pytest.raises(ValidationFailed, match=r"--set train.zero_stage=9: train.zero_stage: Input should be 0, 1, 2 or 3"):
        load_config(None, ["train.zero_stage=9"])
    with pytest.raises(ValidationFailed, match="expected KEY=VALUE"):
        load_config(None, ["optimizer.lr"])


def test_every_section_forbids_unknown_keys():
    with pytest.raises(ValidationFailed, match="unknown key"):
        load_config(None, ["rewards.weights.rubrik=1"])


def test_muonclip_runs_under_every_zero_stage():
    assert load_config(None, ["train.zero_stage=3"]).optimizer.name == "muonclip"


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    if Path(path).name.startswith("synth"):
        from k2rl.synth.config import load_synth_config

        load_synth_config(path)
    else:
        load_config(path)


def test_only_sft_without_evaluation_trains_only():
    """Such a run starts no vLLM engine: nothing in it generates."""
    sft = ["algorithm.name=sft", "env.eval_tasks=8"]
    assert load_config(None, [*sft, "schedule.eval_every=0"]).trains_only
    assert load_config(None, [*sft, "schedule.eval_every=5", "env.eval_tasks=0"]).trains_only
    assert not load_config(None, [*sft, "schedule.eval_every=5"]).trains_only
    assert not load_config(None, ["algorithm.name=k2", "schedule.eval_every=0"]).trains_only
