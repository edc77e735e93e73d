"""k2rl.engines.expert_copy's slicing against vLLM's fused expert layout (w13 = this rank's gate rows
then its up rows, w2 = its columns of down), on plain tensors shaped as vLLM holds them. The copy into
a real vLLM engine is checked on the GPU (tests/test_rollout_engine_gpu.py, exact reload)."""
from types import SimpleNamespace

import pytest
import torch

from k2rl.engines.expert_copy import copy_experts

EXPERTS, HIDDEN, INTER = 3, 4, 6


def vllm_like_module(tp_rank: int, tp_size: int):
    inter = INTER // tp_size
    parallel = SimpleNamespace(tp_rank=tp_rank, tp_size=tp_size)
    return SimpleNamespace(w13_weight=torch.zeros(EXPERTS, 2 * inter, HIDDEN), w2_weight=torch.zeros(EXPERTS, HIDDEN, inter),
                           moe_config=SimpleNamespace(moe_parallel_config=parallel))


@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_each_rank_takes_its_slice(tp_rank, tp_size):
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(EXPERTS, *shape, generator=gen) for shape in
                      [(INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)])
    module = vllm_like_module(tp_rank, tp_size)
    prefix = "model.layers.1.mlp.experts"
    named = [(f"{prefix}.{e}.{proj}.weight", w[e]) for e in range(EXPERTS)
             for proj, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))]
    assert copy_experts({prefix: module}, named) == 3 * EXPERTS
    rows = slice(tp_rank * INTER // tp_size, (tp_rank + 1) * INTER // tp_size)
    assert torch.equal(module.w13_weight, torch.cat([gate[:, rows], up[:, rows]], dim=1))
    assert torch.equal(module.w2_weight, down[:, :, rows])


def test_unknown_names_and_sizes_are_errors():
    module = vllm_like_module(0, 1)
    with pytest.raises(ValueError, match="not a routed expert"):
        copy_experts({"model.layers.1.mlp.experts": module}, [("model.layers.1.mlp.gate.weight", torch.zeros(2))])
    with pytest.raises(ValueError, match="inter size 5"):
        copy_experts({"model.layers.1.mlp.experts": module},
                     [("model.layers.1.mlp.experts.0.gate_proj.weight", torch.zeros(5, HIDDEN))])
