"""MuonClip under DeepSpeed ZeRO stage 0 on two CPU ranks (gloo): the Newton-Schulz work is split
between the ranks and QK-Clip max-reduces the logits, yet both ranks end with identical weights that
match one process training on the whole batch."""
import os

import torch
import torch.multiprocessing as mp

from k2rl.config import OptimizerConfig
from k2rl.engines.world import free_port
from k2rl.model.checkpoint import load_model
from k2rl.optim import apply_qk_clip, build_optimizer
from k2rl.optim.batched import ns_cost, rank_rows, row_plan

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


def test_two_ranks_identical_and_match_single_process(tiny_model_dir, tmp_path):
    mp.spawn(_rank_main, args=(free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["clipped"] > 0  # the max-logit all-reduce and the clip ran
    start = dict(load_model(tiny_model_dir, torch.float32).named_parameters())
    single = dict(_single_process(tiny_model_dir).named_parameters())
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), f"ranks differ on {name}"
        moved = (single[name] - start[name]).norm()
        assert (weight - single[name]).norm() <= 1e-3 * moved + 1e-6, name


def test_row_plan_balances_cost_and_covers_every_row():
    """One K2 MoE layer's NS work (experts, attention projections) over 4 and 8 ranks: every row of every
    batch goes to exactly one rank, and the busiest rank is within one matrix's cost of the ideal (the
    even split of each batch left it 1.6x over at 4 ranks)."""
    batches = [((2048, 7168), 66), ((7168, 2048), 33), ((7168, 8192), 1), ((12288, 1536), 1),
               ((1536, 7168), 1), ((576, 7168), 1), ((16384, 512), 1)]
    for world in (4, 8):
        plan = row_plan(batches, world)
        load = [0] * world
        for (shape, total), rows in zip(batches, plan):
            covered = [row for rank in range(world) for row in range(*rank_rows(rows, rank))]
            assert covered == list(range(total))
            for rank in range(world):
                load[rank] += rows[rank] * ns_cost(shape)
        assert max(load) <= sum(load) / world + max(ns_cost(shape) for shape, _ in batches)
