"""vLLM-CPU's RoPE kernel on MLA's strided query view: the upstream bug, and our exact replacement."""
import pytest
import torch


@pytest.fixture(scope="module")
def rope():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        from vllm.model_executor.layers.rotary_embedding import get_rope

        yield get_rope(64, max_position=4096, rope_parameters={"rope_theta": 50000.0, "rope_type": "default"},
                       is_neox_style=False, dtype=torch.float32)


def _mla_query(tokens: int):
    """q as MLA holds it: [tokens, heads, nope + rope]; RoPE applies to the strided rope slice."""
    torch.manual_seed(tokens)
    return torch.randn(tokens, 4, 32 + 64), torch.randn(tokens, 1, 64), torch.arange(tokens) + 3


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("contiguous", [False, True])
def test_upstream_kernel_still_corrupts_multi_head_queries(rope, tokens, contiguous):
    """When this fails, vLLM fixed its kernel: delete k2rl/engines/vllm_fixes.py and this test."""
    from vllm import _custom_ops as ops

    q, k, pos = _mla_query(tokens)
    expected, _ = rope.forward_native(pos, q[..., 32:].clone(), k.clone())
    view = q[..., 32:].contiguous() if contiguous else q[..., 32:]
    ops.rotary_embedding(pos, view, k.clone(), rope.head_size, rope.cos_sin_cache, rope.is_neox_style)
    assert (view - expected).abs().max() > 1e-2


@pytest.mark.parametrize("tokens", [1, 7])
def test_patched_rope_matches_a_plain_gptj_rotation(rope, tokens):
    from k2rl.engines.vllm_fixes import patch_cpu_rotary

    patch_cpu_rotary()
    q, k, pos = _mla_query(tokens)
    got_q, got_k = rope.forward_cpu(pos, q[..., 32:], k.clone())
    freqs = pos[:, None].float() / 50000.0 ** (torch.arange(0, 64, 2).float() / 64)
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]

    def gptj(x):  # DeepSeek's interleaved RoPE: rotate pairs (x[2i], x[2i+1])
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)

    torch.testing.assert_close(got_q, gptj(q[..., 32:]), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_k, gptj(k), rtol=0, atol=1e-5)
