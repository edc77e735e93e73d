"""k2rl.engines.expert_copy's slicing against vLLM's fused expert layout (w13 = this rank's gate rows
then its up rows, w2 = its columns of down), on plain tensors shaped as vLLM holds them, from whole
expert matrices or from each rank's slice. The copy into a real vLLM engine is checked on the GPU
(tests/test_rollout_engine_gpu.py, exact reload)."""
from types import SimpleNamespace

import pytest
import torch

from k2rl.engines.expert_copy import copy_experts

EXPERTS, HIDDEN, INTER = 3, 4, 6
PREFIX = "model.layers.1.mlp.experts"


def vllm_like_module(tp_rank: int, tp_size: int):
    inter = INTER // tp_size
    parallel = SimpleNamespace(tp_rank=tp_rank, tp_size=tp_size)
    return SimpleNamespace(w13_weight=torch.zeros(EXPERTS, 2 * inter, HIDDEN), w2_weight=torch.zeros(EXPERTS, HIDDEN, inter),
                           moe_config=SimpleNamespace(moe_parallel_config=parallel))


def expert_matrices():
    """Whole gate, up [E, inter, hidden] and down [E, hidden, inter], and each expert's under checkpoint names."""
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(EXPERTS, *shape, generator=gen) for shape in
                      [(INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)])
    named = [(f"{PREFIX}.{e}.{proj}.weight", w[e]) for e in range(EXPERTS)
             for proj, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))]
    return gate, up, down, named


@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_each_rank_takes_its_slice(tp_rank, tp_size):
    gate, up, down, named = expert_matrices()
    module = vllm_like_module(tp_rank, tp_size)
    assert copy_experts({PREFIX: module}, named) == 3 * EXPERTS
    rows = slice(tp_rank * INTER // tp_size, (tp_rank + 1) * INTER // tp_size)
    assert torch.equal(module.w13_weight, torch.cat([gate[:, rows], up[:, rows]], dim=1))
    assert torch.equal(module.w2_weight, down[:, :, rows])


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_pre_sliced_experts_land_where_whole_ones_do(tp_rank):
    """What the trainer's `ExpertShard` export sends: each rank's inter block, already cut out."""
    *_, named = expert_matrices()
    rows = slice(tp_rank * INTER // 2, (tp_rank + 1) * INTER // 2)
    sliced = [(n, w[:, rows] if n.endswith("down_proj.weight") else w[rows]) for n, w in named]
    from_whole, from_sliced = vllm_like_module(tp_rank, 2), vllm_like_module(tp_rank, 2)
    copy_experts({PREFIX: from_whole}, named)
    assert copy_experts({PREFIX: from_sliced}, sliced) == 3 * EXPERTS
    assert from_whole.w13_weight.count_nonzero() == from_whole.w13_weight.numel()
    assert torch.equal(from_sliced.w13_weight, from_whole.w13_weight)
    assert torch.equal(from_sliced.w2_weight, from_whole.w2_weight)


def test_unknown_names_and_sizes_are_errors():
    module = vllm_like_module(0, 1)
    with pytest.raises(ValueError, match="not a routed expert"):
        copy_experts({PREFIX: module}, [("model.layers.1.mlp.gate.weight", torch.zeros(2))])
    with pytest.raises(ValueError, match="experts.0.gate_proj.weight: inter size 5"):
        copy_experts({PREFIX: module}, [(f"{PREFIX}.0.gate_proj.weight", torch.zeros(5, HIDDEN))])
    with pytest.raises(ValueError, match="experts.2.down_proj.weight: inter size 4"):  # neither 3 (slice) nor 6
        copy_experts({PREFIX: vllm_like_module(1, 2)}, [(f"{PREFIX}.2.down_proj.weight", torch.zeros(HIDDEN, 4))])
