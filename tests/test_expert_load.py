"""The routed experts' load the trainer logs (k2rl.model.expert_load), on a real k2-tiny."""
import torch

from k2rl.model.checkpoint import load_model
from k2rl.model.expert_load import ExpertLoad
from k2rl.model.routing import routers


def test_load_counts_training_forwards_and_names_a_collapsed_router(tiny_model_dir):
    model = load_model(tiny_model_dir)
    layers = routers(model)
    experts, top_k = layers[0].num_experts, layers[0].top_k
    ids = torch.randint(20, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    load = ExpertLoad(model)
    with torch.no_grad():
        model(input_ids=ids)  # a logprob pass: not counted
    assert load.take() == {}
    model(input_ids=ids)
    spread = load.take()
    assert 1 <= spread["moe/max_load"] < experts / top_k and 0 <= spread["moe/idle_experts"] < experts - top_k
    for router in layers:  # every token to the first top_k experts, as a collapsed router sends them
        router.e_score_correction_bias[:top_k] = 100.0
    model(input_ids=ids)
    collapsed = load.take()
    assert collapsed == {"moe/max_load": experts / top_k, "moe/idle_experts": (experts - top_k) * len(layers)}
    load.remove()
    model(input_ids=ids)
    assert load.take() == {}


def test_balancing_moves_each_bias_toward_its_underloaded_experts_until_a_collapsed_router_spreads(tiny_model_dir):
    model = load_model(tiny_model_dir)
    layers = routers(model)
    experts, top_k = layers[0].num_experts, layers[0].top_k
    ids = torch.randint(20, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    for router in layers:  # collapsed: the first top_k experts take nearly every token
        router.e_score_correction_bias[:top_k] = 0.2
    load = ExpertLoad(model)
    model(input_ids=ids)
    assert load.take(bias_update=0.01)["moe/max_load"] > 0.95 * experts / top_k
    for router in layers:  # over their share: down; under it: up
        bias = router.e_score_correction_bias
        assert torch.allclose(bias[:top_k], torch.full((top_k,), 0.19))
        assert torch.allclose(bias[top_k:], torch.full((experts - top_k,), 0.01))
    for _ in range(30):
        model(input_ids=ids)
        spread = load.take(bias_update=0.01)
    assert spread["moe/idle_experts"] == 0 and spread["moe/max_load"] < 2  # the untouched router: ~1.5
    model(input_ids=ids)
    before = [r.e_score_correction_bias.clone() for r in layers]
    load.take()  # bias_update 0: measured only
    assert all(torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, layers))
