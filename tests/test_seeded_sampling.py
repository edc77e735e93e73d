"""Batched seeded sampling (k2rl.engines.seeded_sampling): each seeded row's noise depends on its seed
and draw count alone, is Exp(1), and a row sampled in a batch is the row sampled alone. The kernel runs
in Triton's interpreter on the CPU (in a process of its own); vLLM's sampler with CUDA generators runs on the GPU."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k2rl.engines import seeded_sampling
from k2rl.engines.seeded_sampling import exponential_rows

ON_GPU = torch.cuda.is_available()


def fill(device, rows, seeds, draws, shape=(4, 5000)):
    q = torch.full(shape, -1.0, device=device)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    exponential_rows(q, as_tensor(rows), as_tensor(seeds), as_tensor(draws))
    return q.cpu()


def noise_cases(device: str) -> dict[str, torch.Tensor]:
    return {"batch": fill(device, rows=[2, 0], seeds=[7, -(1 << 62)], draws=[0, 3]),
            "alone": fill(device, rows=[3], seeds=[7], draws=[0]),
            "next_draw": fill(device, rows=[3], seeds=[7], draws=[1]),
            "next_seed": fill(device, rows=[3], seeds=[8], draws=[0]),
            "high_bits": fill(device, rows=[3], seeds=[7 + (1 << 40)], draws=[0]),
            "many": fill(device, rows=[0, 1, 2, 3], seeds=[1, 2, 3, 4], draws=[0, 0, 0, 0], shape=(4, 20000))}


@pytest.fixture(scope="module")
def noise(tmp_path_factory):
    """`noise_cases` on the GPU, or in Triton's interpreter in a fresh process on the CPU (the
    interpreter must be on before anything imports Triton, and vLLM has imported it here)."""
    if ON_GPU:
        return noise_cases("cuda")
    out = tmp_path_factory.mktemp("noise") / "cases.pt"
    code = f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
           f"from test_seeded_sampling import noise_cases; torch.save(noise_cases('cpu'), {str(out)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    return torch.load(out)


def test_a_rows_noise_depends_on_its_seed_and_draw_alone(noise):
    q = noise["batch"]
    assert (q[[1, 3]] == -1).all()  # rows without a seed are left alone
    assert torch.equal(noise["alone"][3], q[2])  # the same (seed, draw) in another row and batch
    for other in ("next_draw", "next_seed", "high_bits"):  # the next draw, another seed; all 64 bits count
        assert not torch.equal(noise[other][3], q[2]), other


def test_the_noise_is_exponential(noise):
    q = noise["many"].flatten()
    assert torch.isfinite(q).all() and (q >= 0).all()
    assert abs(q.mean().item() - 1) < 0.02 and abs(q.var().item() - 1) < 0.05
    assert abs((q < math.log(2)).float().mean().item() - 0.5) < 0.01  # the median of Exp(1)


def test_rows_must_be_float32():
    with pytest.raises(ValueError, match="float32"):
        exponential_rows(torch.zeros(2, 8, dtype=torch.float64), *[torch.zeros(1, dtype=torch.int64)] * 3)


@pytest.mark.gpu
def test_vllm_samples_a_seeded_row_alike_in_any_batch_and_by_its_probabilities():
    def generator(seed):
        return torch.Generator(device="cuda").manual_seed(seed)

    probs = torch.softmax(3 * torch.randn(6, 1000, device="cuda", generator=generator(0)), dim=-1)
    batch = seeded_sampling.seeded_random_sample(probs.clone(), {1: generator(11), 4: generator(12)})
    alone = seeded_sampling.seeded_random_sample(probs[4:5].clone(), {0: generator(12)})
    assert batch[4] == alone[0]
    gen = generator(11)
    draws = [seeded_sampling.seeded_random_sample(probs[1:2].clone(), {0: gen}).item() for _ in range(4000)]
    assert gen.get_offset() == 4000 * 4  # every draw moved the generator on
    assert draws[0] == batch[1]  # the first draw of seed 11 is the batch's
    top = probs[1].topk(3).indices.tolist()
    for token in top:  # each likely token about as often as its probability says
        p = probs[1, token].item()
        assert abs(draws.count(token) / 4000 - p) < 4 * math.sqrt(p / 4000) + 1e-3
