"""One optimizer step on one K2 MoE layer's matrices: MuonClip vs fused AdamW vs torch.optim.Muon.

    python scripts/bench_optim.py            # on a GPU: K2's sizes, fp32 master weights
    python scripts/bench_optim.py --small    # quick CPU check of the script itself
    python scripts/bench_optim.py --sharded  # data-parallel MuonClip: the step at N = 1, NS per rank at N = 2, 4, 8

The layer: MLA (hidden 7168, q/kv ranks 1536/512, 64 heads), the router, 32 routed experts stacked as
the model holds them ([E, 2I, H] gate_up, [E, H, I] down) and the shared expert: 1.56 B parameters.
torch.optim.Muon takes 2-D parameters only, so it gets the same matrices one expert at a time and no
norms. Prints ms per step (median of CUDA-event timings), ratios, the part spent in Newton-Schulz,
its flops and the rate achieved, and NS accuracy against fp64.

--sharded simulates N data-parallel ranks on one device: every matrix is orthogonalized whole, once,
on one rank (`k2rl.optim.batched`'s split of each same-shape batch, as under ZeRO 0-3), so a rank's
Newton-Schulz work is its share of the matrices, timed here alone. The other passes of the step
(momentum, decay, update) run on 1/N of the elements under ZeRO 1-3; the all-gathers are not timed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from k2rl.optim.batched import orthogonalize_all, planned_batches, rank_rows
from k2rl.optim.build import muonclip_param_groups
from k2rl.optim.muonclip import MuonClip
from k2rl.optim.newton_schulz import orthogonalize, use_gram

LR, WD = 2e-4, 0.1


def layer_shapes(small: bool) -> dict[str, tuple[int, ...]]:
    h, q_rank, kv_rank, heads, experts, inter, routed = (7168, 1536, 512, 64, 32, 2048, 384)
    if small:
        h, q_rank, kv_rank, heads, experts, inter, routed = (256, 96, 64, 4, 3, 64, 8)
    nope, rope, v = 128, 64, 128
    return {
        "self_attn.q_a_proj.weight": (q_rank, h),
        "self_attn.q_a_layernorm.weight": (q_rank,),
        "self_attn.q_b_proj.weight": (heads * (nope + rope), q_rank),
        "self_attn.kv_a_proj_with_mqa.weight": (kv_rank + rope, h),
        "self_attn.kv_a_layernorm.weight": (kv_rank,),
        "self_attn.kv_b_proj.weight": (heads * (nope + v), kv_rank),
        "self_attn.o_proj.weight": (h, heads * v),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate.weight": (routed, h),
        "mlp.experts.gate_up_proj": (experts, 2 * inter, h),
        "mlp.experts.down_proj": (experts, h, inter),
        "mlp.shared_experts.gate_proj.weight": (inter, h),
        "mlp.shared_experts.up_proj.weight": (inter, h),
        "mlp.shared_experts.down_proj.weight": (h, inter),
    }


def make_params(shapes, device, seed=0) -> dict[str, torch.nn.Parameter]:
    """fp32 weights with random (never zero) gradients."""
    gen = torch.Generator(device).manual_seed(seed)
    params = {}
    for name, shape in shapes.items():
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(shape, device=device, generator=gen) * 1e-3
        params[name] = p
    return params


def as_2d_matrices(params: dict[str, torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The same matrices as separate 2-D parameters (per expert, gate and up apart), for torch's Muon."""
    out = []
    for name, p in params.items():
        if p.ndim < 2:
            continue
        rows = p.shape[-2] // 2 if name.endswith("gate_up_proj") else p.shape[-2]
        for mat, grad in zip(p.detach().view(-1, rows, p.shape[-1]), p.grad.view(-1, rows, p.shape[-1])):
            q = torch.nn.Parameter(mat.clone())
            q.grad = grad.clone()
            out.append(q)
    return out


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ns_flops(n: int, m: int, steps: int = 5) -> float:
    """Matmul flops of one NS5 on an n x m matrix as `orthogonalize` runs it (Gram with one restart or plain)."""
    n, m = min(n, m), max(n, m)
    unit, r = 2 * n**3, m / n
    return unit * ((4 * r + 14) if use_gram(n, m) else (10 * r + 5)) * (steps / 5)


def time_muonclip(params: dict, iters: int):
    """A MuonClip over `params`: (optimizer, its momentum matrices, step ms, Newton-Schulz-only ms)."""
    opt = MuonClip(muonclip_param_groups(params.items()), lr=LR, weight_decay=WD)
    step_ms = median_ms(opt.step, iters)
    group = opt.param_groups[0]
    matrices = [opt.state[p]["momentum_buffer"].view(-1, rows, p.shape[-1])
                for p, rows in zip(group["params"], group["matrix_rows"])]
    ns_ms = median_ms(lambda: orthogonalize_all(matrices, 5, opt.ns_dtype), iters)
    return opt, matrices, step_ms, ns_ms


def bench(small: bool, iters: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = layer_shapes(small)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{total / 1e9:.3f} B parameters, fp32")

    params = make_params(shapes, device)
    opt, matrices, muon_ms, ns_ms = time_muonclip(params, iters)
    flops = sum(m.shape[0] * ns_flops(*m.shape[-2:]) for m in matrices)
    del opt, params, matrices

    params = make_params(shapes, device)
    fused = device == "cuda"
    adamw = torch.optim.AdamW(params.values(), lr=LR, weight_decay=WD, fused=fused, foreach=not fused)
    adamw_ms = median_ms(adamw.step, iters)
    del adamw, params

    mats = as_2d_matrices(make_params(shapes, device))
    torch_muon = torch.optim.Muon(mats, lr=LR, weight_decay=WD, adjust_lr_fn="match_rms_adamw")
    torch_muon_ms = median_ms(torch_muon.step, max(3, iters // 3))
    del torch_muon, mats

    g = torch.randn(*(shapes["mlp.shared_experts.gate_proj.weight"]), device=device)
    ref = orthogonalize(g[None].double(), 5, torch.float64)
    err = {str(dt).removeprefix("torch."): ((orthogonalize(g[None], 5, dt).double() - ref).norm() / ref.norm()).item()
           for dt in (torch.float16, torch.bfloat16)}

    print(f"{'optimizer':<34}{'ms/step':>10}{'x AdamW':>10}")
    for name, ms in (("fused AdamW", adamw_ms), ("MuonClip (k2rl)", muon_ms),
                     ("torch.optim.Muon match_rms_adamw", torch_muon_ms)):
        print(f"{name:<34}{ms:>10.2f}{ms / adamw_ms:>10.2f}")
    print(f"MuonClip vs torch Muon: {torch_muon_ms / muon_ms:.2f}x faster")
    print(f"Newton-Schulz alone: {ns_ms:.2f} ms = {ns_ms / muon_ms:.0%} of the MuonClip step; "
          f"{flops / 1e12:.1f} TFLOP -> {flops / ns_ms / 1e9:.0f} TFLOP/s")
    print("NS5 relative error vs fp64 on one expert matrix: " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))


def rank_matrices(matrices: list[torch.Tensor], world: int, rank: int) -> list[torch.Tensor]:
    """The matrices `rank` of `world` orthogonalizes: its rows of each same-shape batch."""
    out = []
    for _, members, rows in planned_batches(matrices, world):
        batch = torch.cat([matrices[i] for i in members])
        lo, hi = rank_rows(rows, rank)
        if hi > lo:
            out.append(batch[lo:hi])
    return out


def bench_sharded(small: bool, iters: int, worlds: tuple[int, ...] = (2, 4, 8)) -> None:
    """MuonClip's step at N = 1 and each rank's Newton-Schulz at N data-parallel ranks (the busiest rank)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = make_params(layer_shapes(small), device)
    opt, matrices, step_ms, ns_ms = time_muonclip(params, iters)
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"N=1: MuonClip step {step_ms:.2f} ms, Newton-Schulz {ns_ms:.2f} ms ({ns_ms / step_ms:.0%})")
    print(f"{'N':>3}{'NS ms/rank':>12}{'x N=1 NS':>10}{'busiest/ideal':>15}{'est. step ms/rank':>19}")
    for world in worlds:
        costs = [sum(m.shape[0] * ns_flops(*m.shape[-2:]) for m in rank_matrices(matrices, world, r)) for r in range(world)]
        busiest = max(range(world), key=lambda r: costs[r])
        mine = rank_matrices(matrices, world, busiest)
        rank_ns = median_ms(lambda: orthogonalize_all(mine, 5, opt.ns_dtype), iters)
        flops_share = sum(m.shape[0] * ns_flops(*m.shape[-2:]) for m in mine) / sum(
            m.shape[0] * ns_flops(*m.shape[-2:]) for m in matrices)
        estimate = rank_ns + (step_ms - ns_ms) / world
        print(f"{world:>3}{rank_ns:>12.2f}{rank_ns / ns_ms:>10.3f}{flops_share * world:>15.2f}{estimate:>19.2f}")
    print("est. step = NS of the busiest rank + the rest of the N=1 step / N (all-gathers not included)")


def profile(small: bool) -> None:
    """Kernel-level breakdown of one MuonClip step (which matmuls and elementwise passes cost what)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = make_params(layer_shapes(small), device)
    opt = MuonClip(muonclip_param_groups(params.items()), lr=LR, weight_decay=WD)
    for _ in range(3):
        opt.step()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25, max_name_column_width=40))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="print a kernel breakdown of one MuonClip step")
    parser.add_argument("--sharded", action="store_true", help="the step at N = 1 and NS per rank at N = 2, 4, 8")
    args = parser.parse_args()
    if args.profile:
        profile(args.small)
    elif args.sharded:
        bench_sharded(args.small, args.iters)
    else:
        bench(args.small, args.iters)
