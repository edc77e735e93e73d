"""Batched seeded sampling (k2rl.engines.seeded_sampling): each seeded row's noise depends on its seed
and draw count alone, is Exp(1), and a row sampled in a batch is the row sampled alone; the draw count
is each request's kept draws, whatever vLLM takes back, moves or reschedules. The kernel runs in Triton's
interpreter on the CPU (in a process of its own); vLLM's sampler with CUDA generators runs on the GPU."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from k2rl.engines import seeded_sampling
from k2rl.engines.seeded_sampling import DrawLedger, exponential_rows

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
    assert draws[0] == batch[1]  # the first draw of seed 11 is the batch's
    top = probs[1].topk(3).indices.tolist()
    for token in top:  # each likely token about as often as its probability says
        p = probs[1, token].item()
        assert abs(draws.count(token) / 4000 - p) < 4 * math.sqrt(p / 4000) + 1e-3


class OffsetGenerator:
    """A CUDA generator's offset, which a CPU generator does not keep: the CPU's twin of what
    DrawLedger reads and moves (the GPU test below runs the same steps on CUDA generators)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.offset, self.offset_calls = seed, 0, 0

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        self.offset_calls += 1
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset_calls += 1
        self.offset = offset


def kept_draws_through_a_schedule(make_generator, device: str) -> dict[int, list[int]]:
    """Three requests through vLLM's batch as its model runner moves them: chunked prefills whose draws
    it takes back (its `gen.set_offset(gen.get_offset() - 4)`), a finished request, rows moved up, a
    request unscheduled and back to prefill again, one unscheduled while decoding, a swap. Each seed's
    kept draws."""
    ledger = DrawLedger()
    a, b, c = (make_generator(seed) for seed in (1, 2, 3))
    kept = {1: [], 2: [], 3: []}

    def step(batch, taken_back=()):
        rows, seeds, draws = ledger.draw_table(batch, device).tolist()
        for row, seed, draw in zip(rows, seeds, draws):
            if row in taken_back:
                batch[row].set_offset(batch[row].get_offset() - 4)
            else:
                kept[seed].append(draw)

    step({0: a, 1: b}, taken_back={1})  # b prefills in chunks
    step({0: a, 1: b}, taken_back={1})
    step({0: a, 1: b})  # b's last chunk: its draw stands
    step({0: a, 1: b, 2: c}, taken_back={2})
    step({0: b, 1: c})  # a finished; b and c moved up a row
    step({0: b})  # c unscheduled
    step({0: b, 1: c}, taken_back={1})  # c back, prefilling again
    for _ in range(3):
        step({0: b, 1: c})
    step({0: c})  # b unscheduled while decoding
    step({0: c, 1: b})  # b back
    step({0: b, 1: c})  # the two swap rows
    return kept


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_request_counts_its_kept_draws_alone(device):
    if device == "cuda" and not ON_GPU:
        pytest.skip("CUDA generators need a GPU; the CPU case runs the same steps on OffsetGenerator")
    make = OffsetGenerator if device == "cpu" else lambda seed: torch.Generator(device="cuda").manual_seed(seed)
    kept = kept_draws_through_a_schedule(make, device)
    assert kept == {1: [0, 1, 2, 3], 2: list(range(10)), 3: list(range(7))}


def test_a_decoding_row_costs_no_offset_calls():
    """Why the ledger exists: once its draws stand, a row reads and moves no offset (each a host call to
    CUDA), however many steps it decodes."""
    b, c = OffsetGenerator(2), OffsetGenerator(3)
    ledger = DrawLedger()
    for _ in range(2):  # joined, then its draw stood: watched no more
        ledger.draw_table({0: b, 1: c}, "cpu")
    calls = b.offset_calls, c.offset_calls
    for _ in range(100):
        ledger.draw_table({0: b, 1: c}, "cpu")
    assert (b.offset_calls, c.offset_calls) == calls
