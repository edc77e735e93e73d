"""A fix for a vLLM-CPU bug that silently corrupts K2-architecture rollouts; applied before the engine starts.

vLLM 0.32's CPU `rotary_embedding` kernel rotates the wrong elements of MLA's multi-head query: the
strided view `q[..., qk_nope_head_dim:]` and even a contiguous [tokens, heads, rope] copy (a single-head
key comes out right). Prefill, decode and the trainer then disagree by ~1 nat per token once a model
has learned to use positions; a random model hides it (its attention is nearly uniform), which is why
the logprob gap looked like 1e-3 "numerics" before. vLLM's own pure-torch RoPE is exact, and its cost
is nothing next to the rest of a CPU step. `tests/test_vllm_fixes.py` checks the kernel bug still
exists (so this can go when upstream fixes it) and that the patched path is exact.
"""
from __future__ import annotations

import functools


def patch_cpu_rotary() -> None:
    """Make vLLM's CPU RoPE use its exact pure-torch implementation instead of the faulty kernel."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    if getattr(RotaryEmbedding.forward_cpu, "_k2rl_patched", False):
        return

    @functools.wraps(RotaryEmbedding.forward_cpu)
    def forward_cpu(self, positions, query, key=None):
        return self.forward_native(positions, query, key)

    forward_cpu._k2rl_patched = True
    RotaryEmbedding.forward_cpu = forward_cpu
