"""Routing replay on the trainer (k2rl.model.routing): replaying the model's own choice changes
nothing, replaying another choice routes exactly there (gradients still reach the router), rows of -1
keep the trainer's choice; routing rows of a batch (tests/test_train_engine.py: the engine replays them)."""
import pytest
import torch

from k2rl.engines.types import ROUTED_EXPERTS, Generation, TokenBatch, add_routing, completion_batch
from k2rl.model.checkpoint import load_model
from k2rl.model.routing import moe_layer_ids, own_routing, replay_routing


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


def test_moe_layer_ids_follow_the_dense_prefix(model):
    config = model.config
    ids = moe_layer_ids(config)
    assert ids == [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    assert ids[0] == config.first_k_dense_replace


def test_replaying_own_routing_is_exact_and_another_routes_there(model):
    ids = torch.randint(20, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    own = own_routing(model, ids)
    with replay_routing(model, own), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)

    other = (own + 1) % model.config.n_routed_experts  # every token to other experts
    with replay_routing(model, other):
        assert torch.equal(own_routing(model, ids), other)
        logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, base)
    logits.sum().backward()
    assert all(layer.mlp.gate.weight.grad is not None for layer in model.model.layers if hasattr(layer.mlp, "gate"))
    model.zero_grad(set_to_none=True)

    unrouted = other.clone()
    unrouted[1] = -1  # the second sequence has no routing from vLLM: the model routes it itself
    with replay_routing(model, unrouted), torch.no_grad():
        mixed = model(input_ids=ids).logits
    # (up to summation order: the per-expert loop groups tokens by expert, across sequences)
    assert torch.allclose(mixed[0], logits[0].detach(), atol=1e-5)
    assert torch.allclose(mixed[1], base[1], atol=1e-5)
    with torch.no_grad():  # the hooks are gone after the block
        assert torch.equal(model(input_ids=ids).logits, base)


def test_routing_rows_pad_with_minus_one():
    batch = TokenBatch.from_lists([[1, 2, 3, 4], [5, 6]])
    add_routing(batch, [torch.ones(3, 2, 4, dtype=torch.int16), None])
    first, second = batch.token_data[ROUTED_EXPERTS]
    assert first.shape == (4, 2, 4) and (first[:3] == 1).all() and (first[3] == -1).all()
    assert (second == -1).all() and second.shape == (2, 2, 4)
    plain = completion_batch([[1, 2]], [[Generation([3], [-0.1], "length")]])
    assert ROUTED_EXPERTS not in plain.token_data  # no routing recorded: none replayed
