"""MuonClip under DeepSpeed ZeRO stage 0 on two CPU ranks (gloo): the Newton-Schulz work is split
between the ranks and QK-Clip max-reduces the logits, yet both ranks end with identical weights that
match one process training on the whole batch."""
import os
import socket

import torch
import torch.multiprocessing as mp

from k2rl.config import OptimizerConfig
from k2rl.model.checkpoint import load_model
from k2rl.optim import apply_qk_clip, build_optimizer
from k2rl.optim.batched import share_bounds

WORLD, MICRO, STEPS = 2, 2, 3
# fp32 NS and a moderate lr, so that the only difference from one process (the order of the gradient
# sum) stays at rounding level; tau sits under k2-tiny's initial max logit (~0.21), so heads clip.
CFG = OptimizerConfig(lr=2e-3, ns_dtype="float32", qk_clip_tau=0.2)


def _batch(model, step):
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, model.config.vocab_size, (WORLD * MICRO, 16), generator=gen)


def _rank_main(rank, port, model_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = load_model(model_dir, torch.float32)
    ds_config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, CFG), config=ds_config)
    clipped = 0
    for step in range(STEPS):
        ids = _batch(model, step)[rank * MICRO:(rank + 1) * MICRO]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        clipped += apply_qk_clip(engine.module, CFG.qk_clip_tau)["attn/clipped_heads"]
    torch.save({"clipped": clipped, "weights": dict(engine.module.named_parameters())}, f"{out_dir}/rank{rank}.pt")


def _single_process(model_dir):
    model = load_model(model_dir, torch.float32)
    opt = build_optimizer(model, CFG)
    for step in range(STEPS):
        ids = _batch(model, step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        apply_qk_clip(model, CFG.qk_clip_tau)
    return model


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_identical_and_match_single_process(tiny_model_dir, tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["clipped"] > 0  # the max-logit all-reduce and the clip ran
    start = dict(load_model(tiny_model_dir, torch.float32).named_parameters())
    single = dict(_single_process(tiny_model_dir).named_parameters())
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"ranks differ on {name}"
        moved = (single[name] - start[name]).norm()
        assert (weight - single[name]).norm() <= 1e-3 * moved + 1e-6, name


def test_small_batches_spread_over_ranks_and_cover_every_row():
    """Batches with fewer matrices than ranks start at rotating ranks (not all on rank 0); every row of
    every batch is still computed by exactly one rank."""
    world = 4
    totals = [1, 1, 1, 1, 2, 2, 9]  # e.g. single projections, then a stack of experts
    rows_per_rank = [0] * world
    for bucket, total in enumerate(totals):
        covered = []
        for rank in range(world):
            lo, hi = share_bounds(total, world, rank, bucket)
            covered += range(lo, hi)
            rows_per_rank[rank] += hi - lo
        assert sorted(covered) == list(range(total))
    assert max(rows_per_rank) - min(rows_per_rank) <= 2  # without the rotation: 9 / 5 / 3 / 0
