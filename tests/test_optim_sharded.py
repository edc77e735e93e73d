"""MuonClip on sharded training state: the project's TrainEngine under DeepSpeed ZeRO 1, 2 and 3 on
two and four CPU ranks (gloo) against ZeRO 0 in the same processes, on k2-tiny.

Each rank trains the same data shard under every stage; afterwards the weights must match ZeRO 0
(fp tolerance: only the order of the gradient sums differs), be identical on every rank, and each
rank's optimizer state must be ~1/N of ZeRO 0's (the updates gathered whole a bucket of matrices at a
time, several buckets here; with a bucket under one fused expert stack, a stack comes a few experts at
a time and no gather returns more than the bucket, nor receives more than it with the padding). QK-Clip must scale the same rows by the same
factors, and keep doing so on the master partitions (else the next step would undo it and the
weights would drift from ZeRO 0). A checkpoint round trip (with an offload/reload in between) must
restore the sharded momentum: the step after loading equals the step after saving.
"""
import itertools
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import nll

from k2rl.config import JobConfig
from k2rl.engines.train import TokenBatch, TrainEngine
from k2rl.engines.world import free_port
from k2rl.model.modeling import to_checkpoint_names
from k2rl.optim import apply_qk_clip
from k2rl.optim.zero_layout import ShardLayout, Unit, zero3_pieces, zero12_pieces

STEPS, SEQS_PER_RANK, SEQ_LEN = 3, 2, 16
# fp32 NS, so the stages differ by rounding only; tau well under the max logits of k2-tiny on random tokens.
BUCKET_NUMEL = 300_000  # k2-tiny's Muon matrices: 1.3 M elements, the largest stacks 131 k: several buckets
# Under a gate_up stack (8 x 128 x 128 = 131 k, an expert 16 k) and down (8 x 128 x 64 = 65 k, an expert
# 8 k): stacks come a few experts at a time; kv_a_proj (73 k) and kv_b_proj (131 k) each go alone.
SPLIT_BUCKET_NUMEL = 50_000
OPTIMIZER = dict(name="muonclip", lr=2e-3, ns_dtype="float32", qk_clip_tau=0.05)
QK_ROWS = ("self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight")


def _batch(world: int, seed: int, vocab: int) -> TokenBatch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (world * SEQS_PER_RANK, SEQ_LEN), generator=gen)
    return TokenBatch.from_lists(ids.tolist())


def _weights(engine: TrainEngine) -> dict[str, torch.Tensor]:
    return {n: t.clone() for bucket in engine.export_weights(1 << 30) for n, t in bucket}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state tensors (momentum, AdamW moments; not the step counters)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.ndim > 0)


def _clip_factors(engine: TrainEngine, batch: TokenBatch) -> dict[str, torch.Tensor]:
    """One forward (records each head's max logit), QK-Clip as the engine runs it, and the factor each
    q/k row was scaled by."""
    before = _weights(engine)
    with torch.no_grad():
        engine.engine(input_ids=torch.stack(batch.input_ids))
    apply_qk_clip(engine.model, OPTIMIZER["qk_clip_tau"], optimizer=engine.client_optimizer)
    after = _weights(engine)
    return {n: (after[n] / before[n]).mean(dim=1) for n in before if n.endswith(QK_ROWS)}


def assert_buckets(layout: ShardLayout, max_numel: int) -> list[list[Unit]]:
    """`layout.buckets(max_numel)` holds every matrix of every parameter once, in units of whole matrices;
    a bucket is at most `max_numel` elements unless it is one matrix, and its all-gather receives (N x
    the largest rank's share) at most `max_numel`, or N x one matrix's share where a rank holds more
    than max_numel / N of a single matrix in it (no plan can do less)."""
    buckets = layout.buckets(max_numel)
    world, matrix = len(layout.pieces), [math.prod(shape[-2:]) for shape in layout.shapes]
    units = [unit for run in buckets for unit in run]
    assert all(u.start < u.end and u.start % matrix[u.index] == 0 == u.end % matrix[u.index] for u in units)
    assert sorted((u.index, e) for u in units for e in range(u.start, u.end, matrix[u.index])) == [
        (i, e) for i, shape in enumerate(layout.shapes) for e in range(0, math.prod(shape), matrix[i])]
    for run in buckets:
        size = sum(u.end - u.start for u in run)
        assert size <= max_numel or (len(run) == 1 and size == matrix[run[0].index]), run
        one = max((max(_shares(layout, [u])) for u in run if u.end - u.start == matrix[u.index]), default=0)
        assert world * max(_shares(layout, run)) <= max(max_numel, world * one), run
    return buckets


def _shares(layout: ShardLayout, units: list[Unit]) -> list[int]:
    """Each rank's elements of `units`: what it sends to their all-gather."""
    return [sum(pc.end - pc.start for u in units for pc in layout._held(rank, u)) for rank in range(len(layout.pieces))]


def _received(layout: ShardLayout, run: list[Unit]) -> int:
    """The all-gather's receive buffer: N x the largest rank's share of the bucket."""
    return len(layout.pieces) * max(_shares(layout, run))


def _hand_layout(shapes: list[tuple[int, ...]], world: int = 1, zero: int = 1) -> ShardLayout:
    """A layout to plan buckets on: the parameters in one flat buffer split evenly over `world` ranks
    (ZeRO 1/2, no alignment padding), or each split in `world` chunks (ZeRO 3)."""
    shapes = [torch.Size(s) for s in shapes]
    numels = [math.prod(s) for s in shapes]
    if zero == 3:
        chunks = [-(-n // world) for n in numels]
        length, pieces = sum(chunks), zero3_pieces(shapes, chunks, world)
    else:
        length = -(-sum(numels) // world)
        pieces = zero12_pieces(shapes, list(itertools.accumulate([0] + numels[:-1])), length, world)
    return ShardLayout([torch.empty(0) for _ in shapes], shapes, length, pieces, None, 0)


def test_buckets_cut_stacks_between_experts():
    layout = _hand_layout([(7, 3), (4, 6, 5), (2, 10, 10), (3, 4, 4)])
    assert assert_buckets(layout, 70) == [
        [Unit(0, 0, 21)], [Unit(1, 0, 60)], [Unit(1, 60, 120)],  # the stack in runs of two experts
        [Unit(2, 0, 100)], [Unit(2, 100, 200)],  # matrices over the bucket: one each
        [Unit(3, 0, 48)]]
    for max_numel in (1, 16, 29, 30, 61, 200, 10_000):
        assert_buckets(layout, max_numel)
    assert assert_buckets(layout, 10_000) == [[Unit(0, 0, 21), Unit(1, 0, 120), Unit(2, 0, 200), Unit(3, 0, 48)]]


def test_buckets_draw_from_every_rank():
    """A run of experts lies in one or two ranks' regions, so a bucket of consecutive experts (the old
    plan) all-gathered up to N x the bucket; a bucket now takes each rank's units in turn."""
    # ZeRO 1/2, 4 ranks of 96 elements: a stack of 16 experts of 16 (ranks 0-2), one of 16 of 8 (2-3).
    layout = _hand_layout([(16, 4, 4), (16, 4, 2)], world=4)
    buckets = assert_buckets(layout, 64)  # 16 elements a rank: one expert, or two of the second stack
    assert buckets[0] == [Unit(0, 0, 16), Unit(0, 112, 128), Unit(0, 208, 224), Unit(1, 48, 64)]  # rank 0, 1, 2, 3
    assert Unit(0, 80, 112) in buckets[-1]  # an expert on rank 0 and one on rank 1: 16 elements on each
    assert [_received(layout, run) for run in buckets] == [64] * 6  # the old plan: [Unit(0, 0, 64)], 256
    # ZeRO 3, 16 ranks: a stack of 32 experts of 16 (2 a rank), a 16 x 16 matrix (16 a rank, balanced
    # by itself) and a stack whose experts straddle two ranks.
    layout = _hand_layout([(32, 4, 4), (16, 16), (8, 2, 8)], world=16, zero=3)
    buckets = assert_buckets(layout, 256)
    assert max(_received(layout, run) for run in buckets) == 256  # the old plan: 16 x 32 = 512
    assert [Unit(1, 0, 256)] in buckets
    for world, zero in itertools.product((2, 3, 4, 16), (1, 3)):
        for max_numel in (1, 8, 16, 30, 64, 100, 256, 1000):
            assert_buckets(_hand_layout([(16, 4, 4), (5, 3), (16, 4, 2), (16, 16), (8, 2, 8)], world, zero), max_numel)


K2_STACKS = [(384, 4096, 7168), (384, 7168, 2048)]  # a K2 MoE layer's fused gate_up and down stacks


@pytest.mark.parametrize("zero", [1, 3])
def test_buckets_of_a_k2_moe_layer_bound_the_receive_buffer(zero):
    """K2's fused stacks ([384, 2 x 2048, 7168] gate_up: 11.3 G elements, an expert 29.4 M; down, an
    expert 14.7 M) at the default 2^28-element bucket: at most 9 gate_up experts (264 M) a bucket. Its
    all-gather receives 235 M (8 experts, one from each rank) at N = 8, and at N = 64 / 256, where one
    rank holds a whole expert (over 2^28 / N), N x that expert: 1.88 G / 7.5 G. The old in-order plan
    received N x 9 experts of one rank's region: 2.1 G at N = 8, and at 64+ ranks 16.9 G (ZeRO 1: both
    stacks) or 11.3 G (ZeRO 3: the whole gate_up stack)."""
    expert = 4096 * 7168
    for world, received, count in [(8, 8 * expert, 72), (64, 64 * expert, 64), (256, 256 * expert, 64 + (zero == 3))]:
        layout = _hand_layout(K2_STACKS, world, zero)
        buckets = assert_buckets(layout, 1 << 28)
        assert max(sum(u.end - u.start for u in run) for run in buckets) <= 9 * expert
        assert max(_received(layout, run) for run in buckets) == received, world
        assert len(buckets) == count, world  # the old plan: 64


def _recording(gather, sizes: list[tuple[int, int]]):
    """`ShardLayout.gather` that appends (elements, matrices) of everything it brings to `sizes`."""
    def recorded(local, units):
        out = gather(local, units)
        sizes.append((sum(t.numel() for t in out), sum(t.shape[0] for t in out)))
        return out
    return recorded


def _rank_main(rank, world, port, model_dir, out_dir, stages, bucket):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    results = {}
    for stage in stages:
        engine = TrainEngine(model_dir, JobConfig(optimizer=dict(OPTIMIZER, zero_bucket_numel=bucket),
                                                  train={"zero_stage": stage}))
        vocab = engine.model.config.vocab_size
        layouts = [layout for _, layout in engine.client_optimizer.partitions.values()]
        gathered = []  # (elements, matrices) of every gather: ZeRO 1-3, whole matrices a bucket at a time
        for layout in layouts:
            assert_buckets(layout, bucket)
            layout.gather = _recording(layout.gather, gathered)
        if stage:
            assert max(len(layout.buckets(bucket)) for layout in layouts) > 1
        if stage and bucket == SPLIT_BUCKET_NUMEL:
            assert any(u.end - u.start < math.prod(layout.shapes[u.index])
                       for layout in layouts for run in layout.buckets(bucket) for u in run), "no stack split"
        factors = _clip_factors(engine, _batch(world, 100, vocab).shard(rank, world))
        clipped = [engine.train_step(_batch(world, s, vocab).shard(rank, world), nll)["attn/clipped_heads"]
                   for s in range(STEPS)]
        result = dict(factors=factors, clipped=clipped, weights=_weights(engine),
                      state_bytes=state_bytes(engine.client_optimizer))
        assert bool(gathered) == bool(stage) and all(n <= bucket or k == 1 for n, k in gathered), (stage, gathered)
        # The fused stacks a direct expert copy reads (ZeRO-3: gathered one at a time) are the experts
        stacks = dict(to_checkpoint_names((n, t.clone()) for n, t in engine.expert_stacks()))
        assert stacks and all(torch.equal(t, result["weights"][n]) for n, t in stacks.items()), f"ZeRO {stage}"
        engine.save_checkpoint(f"{out_dir}/ckpt{stage}")
        engine.offload()
        engine.reload()
        extra = _batch(world, STEPS, vocab).shard(rank, world)
        engine.train_step(extra, nll)
        result["after_save"] = _weights(engine)
        engine.load_checkpoint(f"{out_dir}/ckpt{stage}")
        engine.train_step(extra, nll)
        result["after_load"] = _weights(engine)
        results[stage] = result
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("world,stages,bucket", [(2, (0, 1, 2, 3), BUCKET_NUMEL), (4, (0, 1, 3), BUCKET_NUMEL),
                                                  (2, (0, 1, 3), SPLIT_BUCKET_NUMEL)],
                         ids=["2ranks", "4ranks", "2ranks-experts-split"])
def test_sharded_muonclip_matches_zero0(world, stages, bucket, tiny_model_dir, tmp_path):
    mp.spawn(_rank_main, args=(world, free_port(), str(tiny_model_dir), str(tmp_path), stages, bucket), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    ref = ranks[0][0]
    assert sum(ref["clipped"]) > 0 and any(bool((f < 1).any()) for f in ref["factors"].values())
    start = _weights_of_checkpoint(tiny_model_dir)
    print(f"\noptimizer state bytes per rank, N={world}: "
          + ", ".join(f"ZeRO {s}: {ranks[0][s]['state_bytes']}" for s in stages))
    for stage in stages[1:]:
        got = ranks[0][stage]
        for rank in ranks[1:]:
            for name, weight in got["weights"].items():
                assert torch.equal(weight, rank[stage]["weights"][name]), f"ZeRO {stage}: ranks differ on {name}"
        for name, weight in got["weights"].items():
            moved = (ref["weights"][name] - start[name]).norm()
            assert (weight - ref["weights"][name]).norm() <= 1e-3 * moved + 1e-6, f"ZeRO {stage}: {name}"
        assert got["clipped"] == ref["clipped"], f"ZeRO {stage}"
        for name, factor in got["factors"].items():
            torch.testing.assert_close(factor, ref["factors"][name], rtol=0, atol=1e-6, msg=f"ZeRO {stage}: {name}")
        for rank in ranks:
            share = rank[stage]["state_bytes"] / rank[0]["state_bytes"]
            assert 0.9 / world <= share <= 1.1 / world, f"ZeRO {stage}: state share {share:.3f} at N={world}"
            for name, weight in rank[stage]["after_load"].items():
                torch.testing.assert_close(weight, rank[stage]["after_save"][name], rtol=0, atol=1e-7,
                                           msg=f"ZeRO {stage}: step after load differs on {name}")


def _weights_of_checkpoint(model_dir) -> dict[str, torch.Tensor]:
    from k2rl.model.checkpoint import load_model
    from k2rl.model.modeling import export_weights

    return dict(export_weights(load_model(model_dir, torch.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_k2rl_train_runs_muonclip_under_zero(stage, tiny_model_dir, tmp_path):
    """`k2rl train configs/tiny-cpu.yaml --set train.zero_stage=N` (MuonClip, two workers): steps,
    QK-Clip and a checkpoint. SFT on oracle dialogs, so the gradient is never zero (a random model's
    RL rollouts all earn the same reward: zero advantages, zero gradient)."""
    from test_train_run import _cmd, _metrics, _run

    done = _run(_cmd(tmp_path, "zero", tiny_model_dir, f"train.zero_stage={stage}", "schedule.steps=2",
                     "schedule.eval_every=0", "schedule.checkpoint_every=2", "algorithm.name=sft",
                     "algorithm.tasks_per_step=4"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _metrics(tmp_path / "zero")
    assert [r["step"] for r in rows][-2:] == [1, 2]
    assert "time/setup_train" in rows[0] and "time/setup_rollout" not in rows[0]  # SFT without eval: no vLLM
    for row in rows[-2:]:
        assert row.get("train/grad_norm", 0) > 0 and "attn/clipped_heads" in row, row
    assert (tmp_path / "zero" / "checkpoints" / "latest").read_text().strip() == "step_2"
