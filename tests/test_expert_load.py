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
