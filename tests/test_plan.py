"""`k2rl plan`: K2's counts, how ZeRO / TP / offload move memory between the parts, the fewest GPUs
that fit, and the k2-mini figures measured on the H200 (PLATFORM.md)."""
import pytest
from transformers import DeepseekV3Config

from k2rl.cli import main
from k2rl.model.plan import GIB, GPU_GIB, RUNTIME_GIB, Layout, count_parameters, plan, plan_layout, smallest_gpus, smallest_tp
from k2rl.model.presets import preset_config

STATE = ("weights bf16", "master fp32", "grads bf16", "muonclip state")


@pytest.fixture(scope="module")
def k2():
    config = DeepseekV3Config(**preset_config("k2"))
    return config, count_parameters(config)


def test_k2_counts_match_the_report(k2):
    _, counts = k2
    assert 1.0e12 < counts.total < 1.06e12  # ~1.04 T in the K2 report (incl. embeddings)
    assert 30e9 < counts.active < 34e9  # ~32 B activated
    assert 0.99 < counts.muon / counts.total < 1  # embeddings, lm_head and vectors stay on AdamW


def test_each_zero_stage_splits_its_parts_over_n(k2):
    config, counts = k2
    for stage, split in ((0, ()), (1, ("master fp32", "muonclip state")),
                         (2, ("master fp32", "muonclip state", "grads bf16")), (3, STATE)):
        small, large = (plan_layout(config, counts, Layout(n, stage, tp=8)).train for n in (64, 128))
        for part in STATE:
            assert small[part] == pytest.approx(large[part] * (2 if part in split else 1)), (stage, part)
        assert small["activations"] == large["activations"] and small["runtime"] == large["runtime"]


def test_optimizer_state_is_one_buffer_per_muon_matrix_and_two_for_the_rest(k2):
    config, counts = k2
    muon = plan_layout(config, counts, Layout(1, 0)).train["muonclip state"] * GIB
    adamw = plan_layout(config, counts, Layout(1, 0, "adamw")).train["adamw state"] * GIB
    assert muon == pytest.approx(4 * counts.muon + 8 * (counts.total - counts.muon))
    assert adamw == pytest.approx(8 * counts.total)


def test_rollout_weights_split_over_tp_kv_cache_does_not(k2):
    config, counts = k2
    tp8, tp16 = (plan_layout(config, counts, Layout(128, 3, tp=tp)) for tp in (8, 16))
    assert tp8.rollout["vLLM weights"] == pytest.approx(2 * tp16.rollout["vLLM weights"])
    assert tp8.rollout["KV cache"] == tp16.rollout["KV cache"]  # MLA's latent cache has no heads to split
    assert tp16.sync_gib * 16 * GIB == pytest.approx(counts.total * 2)  # each engine rank gets its shard
    kept = plan_layout(config, counts, Layout(128, 3, tp=16, offload=False))
    assert kept.rollout["trainer left"] == pytest.approx(sum(kept.train[p] for p in STATE))
    assert kept.host_gib == 0 < tp16.host_gib


@pytest.mark.parametrize("gpu", sorted(GPU_GIB))
def test_smallest_n_is_where_it_starts_to_fit(k2, gpu):
    config, counts = k2
    capacity = GPU_GIB[gpu]
    tp = smallest_tp(config, counts, Layout(8, 3), capacity)
    layout = Layout(tp, 3, tp=tp)
    assert not plan_layout(config, counts, Layout(tp, 3, tp=tp // 2)).rollout_gib <= capacity
    n = smallest_gpus(config, counts, layout, capacity)
    assert plan_layout(config, counts, Layout(n, 3, tp=layout.tp)).fits(capacity)
    assert not plan_layout(config, counts, Layout(n - layout.tp, 3, tp=layout.tp)).fits(capacity)
    assert smallest_gpus(config, counts, Layout(8, 1, tp=layout.tp), capacity) is None  # ZeRO-1 keeps whole weights


def test_bad_layout_names_the_flag(k2):
    config, counts = k2
    with pytest.raises(ValueError, match="--gpus 10 is not a multiple of --tp 4.*pick --gpus 12"):
        plan_layout(config, counts, Layout(10, 3, tp=4))
    with pytest.raises(ValueError, match="384 experts over --tp 5"):
        plan_layout(config, counts, Layout(10, 3, tp=5, expert_parallel=True))


def test_k2_mini_against_memory_measured_on_the_h200():
    """PLATFORM.md, k2-mini on one H200: the ZeRO-1 training state the offload benchmark moves (bf16
    weights, fp32 master, AdamW moments; grads are freed after the step) is 33.3 GiB; TRAIN right
    after set-up holds the fp32 trainer weights (MuonClip keeps the model in fp32; no grads or
    optimizer state exist yet) plus ~2 GiB of runtime and vLLM leftovers: 11.9 GiB."""
    p = plan("k2-mini", 1, 1, "adamw")
    assert p.train["weights bf16"] + p.train["master fp32"] + p.train["adamw state"] == pytest.approx(33.3, abs=0.1)
    assert p.train["master fp32"] + RUNTIME_GIB == pytest.approx(11.9, abs=0.5)


def test_cli_prints_both_phases_and_the_fewest_gpus(capsys):
    assert main(["plan", "--preset", "k2-mini", "--gpus", "2", "--zero", "1", "--tp", "2", "--gpu", "80gb"]) == 0
    out = capsys.readouterr().out
    assert "B active per token" in out and "TRAIN" in out and "ROLLOUT" in out
    assert "weight sync" in out and "smallest N that fits with this layout: 2" in out
    assert main(["plan", "--preset", "k2-mini", "--gpus", "3", "--tp", "2"]) == 2
    assert "--gpus 3 is not a multiple of --tp 2" in capsys.readouterr().out
