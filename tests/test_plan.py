from k2rl.cli import main
from k2rl.model.plan import plan


def test_k2_counts_match_the_report():
    p = plan("k2", gpus=256, zero_stage=3)
    assert 1.0e12 < p.total < 1.06e12  # ~1.04 T in the K2 report (incl. embeddings)
    assert 30e9 < p.active < 34e9  # ~32 B activated
    assert abs(p.per_gpu_gib - p.total * (2 + 2 + 8) / 256 / (1 << 30)) < 1e-6


def test_zero_stages_partition_more(capsys):
    assert plan("k2-mini", 8, 3).per_gpu_gib < plan("k2-mini", 8, 1).per_gpu_gib < plan("k2-mini", 8, 0).per_gpu_gib
    assert main(["plan", "--preset", "k2-mini", "--gpus", "1", "--zero", "0"]) == 0
    assert "B active per token" in capsys.readouterr().out
