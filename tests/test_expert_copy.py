"""k2rl.engines.expert_copy's blocks against vLLM's fused expert layout (w13 = this rank's gate rows
then its up rows, w2 = its columns of down), on plain tensors shaped and typed as vLLM holds them,
from the trainer's fused stacks. The copy into a real vLLM engine is checked on the GPU
(tests/test_rollout_engine_gpu.py, exact reload)."""

import pytest
import torch
from transformers import DeepseekV3Config

from k2rl.engines.expert_copy import copy_experts, expert_buffers
from k2rl.model.modeling import build_model, to_checkpoint_names
from k2rl.model.presets import preset_config

EXPERTS, HIDDEN, INTER = 3, 4, 6
PREFIX = "model.layers.1.mlp.experts"


def trainer_stacks():
    """fp32 stacks as the trainer holds them: gate_up [E, 2I, H] (gate rows, then up rows), down [E, H, I]."""
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen)
    down = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen)
    return gate_up, down


@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2), (2, 3)])
def test_each_rank_takes_its_block_cast_to_vllms_dtype(tp_rank, tp_size):
    gate_up, down = trainer_stacks()
    module = expert_buffers(EXPERTS, HIDDEN, INTER, tp_rank, tp_size)
    written = copy_experts({PREFIX: module}, [(f"{PREFIX}.gate_up_proj", gate_up), (f"{PREFIX}.down_proj", down)])
    rows = slice(tp_rank * INTER // tp_size, (tp_rank + 1) * INTER // tp_size)
    gate, up = gate_up[:, :INTER], gate_up[:, INTER:]
    assert torch.equal(module.w13_weight, torch.cat([gate[:, rows], up[:, rows]], dim=1).bfloat16())
    assert torch.equal(module.w2_weight, down[:, :, rows].bfloat16())
    assert written == 2 * (module.w13_weight.numel() + module.w2_weight.numel())  # bf16 bytes, the rank's share


def test_a_real_models_stacks_land_as_its_checkpoint_experts():
    """The layout vLLM's own loader fills from the checkpoint (gate_proj rows, then up_proj rows) is
    the one the direct copy fills from the trainer's stacks, on a real K2-architecture model."""
    model = build_model(DeepseekV3Config(**preset_config("k2-tiny")), seed=0)
    config = model.config
    checkpoint = dict(to_checkpoint_names(model.named_parameters()))
    stacks = [(n, p.detach()) for n, p in model.named_parameters() if n.startswith(PREFIX + ".")]
    for tp_rank in range(2):
        module = expert_buffers(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, tp_rank, 2)
        copy_experts({PREFIX: module}, stacks)
        block = config.moe_intermediate_size // 2
        rows = slice(tp_rank * block, (tp_rank + 1) * block)
        for e in range(config.n_routed_experts):
            ref = {p: checkpoint[f"{PREFIX}.{e}.{p}.weight"].detach().bfloat16() for p in ("gate_proj", "up_proj", "down_proj")}
            assert torch.equal(module.w13_weight[e, :block], ref["gate_proj"][rows])
            assert torch.equal(module.w13_weight[e, block:], ref["up_proj"][rows])
            assert torch.equal(module.w2_weight[e], ref["down_proj"][:, rows])


def test_unknown_names_and_sizes_are_errors():
    gate_up, down = trainer_stacks()
    module = expert_buffers(EXPERTS, HIDDEN, INTER)
    with pytest.raises(ValueError, match="not a routed-expert stack"):
        copy_experts({PREFIX: module}, [("model.layers.1.mlp.gate.weight", torch.zeros(2))])
    with pytest.raises(ValueError, match="not a routed-expert stack"):  # per-expert checkpoint names
        copy_experts({PREFIX: module}, [(f"{PREFIX}.0.gate_proj.weight", gate_up[0, :INTER])])
    with pytest.raises(ValueError, match="gate_up_proj: intermediate size 5"):
        copy_experts({PREFIX: module}, [(f"{PREFIX}.gate_up_proj", gate_up[:, :-1])])
    with pytest.raises(ValueError, match="down_proj: intermediate size 4"):  # vLLM holds 3 of 6 per rank
        copy_experts({PREFIX: expert_buffers(EXPERTS, HIDDEN, INTER, 1, 2)}, [(f"{PREFIX}.down_proj", down[:, :, :4])])
    with pytest.raises(ValueError, match=r"down_proj: this rank's block is \(2, 4, 6\)"):  # one expert short
        copy_experts({PREFIX: module}, [(f"{PREFIX}.down_proj", down[:2])])
