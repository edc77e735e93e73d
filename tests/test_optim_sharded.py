"""MuonClip on sharded training state: the project's TrainEngine under DeepSpeed ZeRO 1, 2 and 3 on
two and four CPU ranks (gloo) against ZeRO 0 in the same processes, on k2-tiny.

Each rank trains the same data shard under every stage; afterwards the weights must match ZeRO 0
(fp tolerance: only the order of the gradient sums differs), be identical on every rank, and each
rank's optimizer state must be ~1/N of ZeRO 0's (the updates gathered whole a bucket of matrices at a
time, several buckets here). QK-Clip must scale the same rows by the same
factors, and keep doing so on the master partitions (else the next step would undo it and the
weights would drift from ZeRO 0). A checkpoint round trip (with an offload/reload in between) must
restore the sharded momentum: the step after loading equals the step after saving.
"""
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

STEPS, SEQS_PER_RANK, SEQ_LEN = 3, 2, 16
# fp32 NS, so the stages differ by rounding only; tau well under the max logits of k2-tiny on random tokens.
BUCKET_NUMEL = 300_000  # k2-tiny's Muon matrices: 1.3 M elements, the largest stacks 131 k: several buckets
OPTIMIZER = dict(name="muonclip", lr=2e-3, ns_dtype="float32", qk_clip_tau=0.05, zero_bucket_numel=BUCKET_NUMEL)
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


def _rank_main(rank, world, port, model_dir, out_dir, stages):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    results = {}
    for stage in stages:
        engine = TrainEngine(model_dir, JobConfig(optimizer=OPTIMIZER, train={"zero_stage": stage}))
        vocab = engine.model.config.vocab_size
        for _, layout in engine.client_optimizer.partitions.values():  # ZeRO 1-3: whole matrices a bucket at a time
            runs = [[layout.shapes[i].numel() for i in run] for run in layout.buckets(BUCKET_NUMEL)]
            assert sorted(i for run in layout.buckets(BUCKET_NUMEL) for i in run) == list(range(len(layout.shapes)))
            assert all(sum(run) <= BUCKET_NUMEL or len(run) == 1 for run in runs)
        if stage:
            assert max(len(layout.buckets(BUCKET_NUMEL)) for _, layout in engine.client_optimizer.partitions.values()) > 1
        factors = _clip_factors(engine, _batch(world, 100, vocab).shard(rank, world))
        clipped = [engine.train_step(_batch(world, s, vocab).shard(rank, world), nll)["attn/clipped_heads"]
                   for s in range(STEPS)]
        result = dict(factors=factors, clipped=clipped, weights=_weights(engine),
                      state_bytes=state_bytes(engine.client_optimizer))
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


@pytest.mark.parametrize("world,stages", [(2, (0, 1, 2, 3)), (4, (0, 1, 3))], ids=["2ranks", "4ranks"])
def test_sharded_muonclip_matches_zero0(world, stages, tiny_model_dir, tmp_path):
    mp.spawn(_rank_main, args=(world, free_port(), str(tiny_model_dir), str(tmp_path), stages), nprocs=world)
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
