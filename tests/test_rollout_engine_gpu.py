"""RolloutEngine on a GPU (bf16, sleep mode): sleep frees vLLM's memory, and in-place reloads after a
sleep (experts copied straight into vLLM's tensors) take effect and are exact, in eager mode and with
CUDA graphs."""
import pytest
import torch

from k2rl.engines.types import SamplingConfig, is_routed_expert
from k2rl.model.checkpoint import load_model
from k2rl.model.modeling import export_weights

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [100, 200, 300, 400, 500]]
GREEDY = SamplingConfig(temperature=0, max_tokens=16)


def used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def generate(engine):
    return [(g.token_ids, g.logprobs) for (g,) in engine.generate(PROMPTS, GREEDY)]


def reload(engine, model):
    """As the worker syncs: everything but the routed experts through vLLM's reload, then the fp32
    fused expert stacks copied (and cast) straight into vLLM's fused tensors (k2rl.engines.expert_copy)."""
    engine.sleep()
    engine.wake(("weights",))
    named = [(n, t.to("cuda", torch.bfloat16)) for n, t in export_weights(model)]
    engine.load_weights((n, t) for n, t in named if not is_routed_expert(n))
    stacks = [(n, p.detach().to("cuda")) for n, p in model.named_parameters() if is_routed_expert(n)]
    assert engine.load_experts(stacks) == sum(t.numel() * 2 for _, t in stacks)  # all of them (TP 1), in bf16
    engine.wake(("kv_cache",))


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda_graphs"])
def test_sleep_frees_memory_and_reload_is_exact(gpu_model_dir, enforce_eager):
    from k2rl.engines.rollout import RolloutEngine

    before = used_gib()
    engine = RolloutEngine(gpu_model_dir, dtype="bfloat16", max_model_len=512, kv_cache_memory_bytes=2 << 30,
                           enforce_eager=enforce_eager)
    awake = used_gib()
    assert engine.direct_experts  # unquantized experts without EP on a GPU: straight copies
    first = generate(engine)
    engine.sleep()
    asleep = used_gib()
    # run with -s (gpu_check.sh does): capsys would take away the real stdout vLLM needs at start-up
    print(f"\n[{'eager' if enforce_eager else 'graphs'}] GPU memory used: before {before:.2f} GiB, "
          f"awake {awake:.2f} GiB, asleep {asleep:.2f} GiB (leftover {asleep - before:.2f} GiB)")
    assert awake - asleep > 0.9 * 2  # at least the 2 GiB KV cache left
    assert asleep - before < 1.5  # CUDA context, graphs' pools and allocator slack stay

    model = load_model(gpu_model_dir).eval()
    reload(engine, model)  # sleep level 2 dropped the weights: the trainer's come back on every wake
    assert generate(engine) == first  # the round trip (sleep, reload, wake) is bit-identical
    torch.manual_seed(3)
    perturbed = load_model(gpu_model_dir).eval()
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reload(engine, perturbed)
    assert generate(engine) != first  # the reload reached the weights the (captured) kernels read
    reload(engine, model)
    assert generate(engine) == first  # and is exact: back to the original weights, back to the same outputs
    del engine
