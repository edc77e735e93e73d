"""Size a K2-family job before launching: parameter counts, and per-GPU memory in both colocated phases.

Counts come from building the model on the meta device (no memory), so they match what the trainer
builds exactly; which matrices Muon takes comes from the optimizer's own grouping.

Per GPU, in the two phases a colocated worker alternates between (docs/worker.md):

- TRAIN: bf16 compute weights, fp32 master weights, bf16 grads and fp32 optimizer state (MuonClip: one
  momentum buffer per Muon matrix, two AdamW moments for the rest; AdamW: two for all), partitioned
  by ZeRO (1: optimizer state and master, 2: + grads, 3: + weights), plus activations (an estimate,
  below) and the runtime's share (CUDA context, communicator buffers, vLLM's leftovers while asleep).
- ROLLOUT: vLLM's weights in the rollout dtype, split over the engine's `tp` GPUs, MLA's absorbed
  copies of `kv_b_proj` that vLLM builds after loading, the KV cache (MLA's latent is not split by TP:
  every engine rank caches the whole of it), and what the trainer leaves on the GPU (its whole state
  when trainer offload is off).

docs/cluster.md compares these assumptions with memory measured on the H200 (k2-mini).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from transformers import DeepseekV3Config

from k2rl.model.modeling import build_model
from k2rl.model.presets import preset_config

GIB = 1 << 30
# Memory torch can allocate (torch.cuda.mem_get_info total): H200 "141 GB" measured on the lent H200
# (nvidia-smi says 143771 MiB); H100/A100 "80 GB" as their out-of-memory errors state it.
GPU_GIB = {"h200": 139.80, "80gb": 79.19}
# Measured on the H200 with k2-mini (PLATFORM.md): in TRAIN, besides the trainer's weights, ~2 GiB
# stay in use (CUDA context, allocator, vLLM asleep); after the pinned trainer offload 0.06 GiB stay.
RUNTIME_GIB = 2.0
OFFLOAD_LEFT_GIB = 0.06
KV_BYTES = 2  # vLLM's KV cache in bf16, also with fp8 weights


@dataclass(frozen=True)
class Counts:
    total: int
    active: int
    experts: int  # routed-expert parameters
    muon: int  # parameters in matrices MuonClip orthogonalizes (the rest is on AdamW)
    mla_absorbed: int  # vLLM's extra W_UK_T / W_UV copies of every kv_b_proj


@dataclass(frozen=True)
class Layout:
    """How the job runs: the knobs `k2rl plan` takes (mirroring train.*, rollout.* and workers.*)."""

    gpus: int
    zero_stage: int = 3
    optimizer: str = "muonclip"
    tp: int = 1
    expert_parallel: bool = False
    offload: bool = True
    micro_batch_tokens: int = 4096
    gradient_checkpointing: bool = True
    kv_tokens: int = 65536
    rollout_bytes: int = 2  # bf16; 1 for fp8 weights (K2's released checkpoint)


@dataclass
class Plan:
    counts: Counts
    layout: Layout
    train: dict[str, float] = field(default_factory=dict)  # GiB per GPU by part
    rollout: dict[str, float] = field(default_factory=dict)
    sync_gib: float = 0.0  # weights each GPU's engine rank receives per sync (its TP shard)
    gather_gib: float = 0.0  # what ZeRO-3 all-gathers into each GPU to feed the sync
    host_gib: float = 0.0  # pinned host memory per GPU for the trainer's offloaded state

    @property
    def train_gib(self) -> float:
        return sum(self.train.values())

    @property
    def rollout_gib(self) -> float:
        return sum(self.rollout.values())

    @property
    def peak_gib(self) -> float:
        return max(self.train_gib, self.rollout_gib)

    def fits(self, capacity_gib: float) -> bool:
        return self.peak_gib <= capacity_gib


def count_parameters(config: DeepseekV3Config) -> Counts:
    from k2rl.optim.build import muonclip_param_groups

    with torch.device("meta"):
        model = build_model(config)
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".mlp.experts." in name:
            experts += p.numel()
    active = total - experts + experts * config.num_experts_per_tok // config.n_routed_experts
    muon = sum(p.numel() for p in muonclip_param_groups(model.named_parameters())[0]["params"])
    absorbed = (config.num_hidden_layers * config.num_attention_heads
                * (config.qk_nope_head_dim + config.v_head_dim) * config.kv_lora_rank)
    return Counts(total, active, experts, muon, absorbed)


def activation_bytes(config: DeepseekV3Config, tokens: int, checkpointing: bool) -> float:
    """Rough size of what autograd keeps for one micro-batch of `tokens`: one bf16 copy of each
    intermediate of a layer (MLA projections, per-head q/k/v, attention output, norms/residuals, the
    routed and shared experts' gate/up/act), the fp32 logits (`model.fp32_head`, the default) and their log-softmax. Flash attention
    keeps no seq^2 term. With checkpointing only each layer's input is kept, plus one layer recomputed."""
    c = config
    heads = c.num_attention_heads
    attention = (4 * c.hidden_size + c.q_lora_rank + c.kv_lora_rank + c.qk_rope_head_dim
                 + 2 * heads * (c.qk_nope_head_dim + c.qk_rope_head_dim) + 2 * heads * c.v_head_dim)
    moe = (c.num_experts_per_tok + c.n_shared_experts) * 3 * c.moe_intermediate_size + c.num_experts_per_tok * c.hidden_size
    layer = 2 * tokens * (attention + max(moe, 3 * c.intermediate_size))
    logits = tokens * c.vocab_size * (4 + 4)  # fp32 logits (k2rl.model.head) and their log-softmax
    if checkpointing:
        return c.num_hidden_layers * tokens * c.hidden_size * 2 + layer + logits
    return c.num_hidden_layers * layer + logits


def validate_layout(config: DeepseekV3Config, layout: Layout) -> None:
    if layout.gpus % layout.tp:
        raise ValueError(f"--gpus {layout.gpus} is not a multiple of --tp {layout.tp}: a rollout engine spans "
                         f"tp GPUs (engines = gpus / tp); pick --gpus {layout.tp * math.ceil(layout.gpus / layout.tp)}")
    if layout.expert_parallel and config.n_routed_experts % layout.tp:
        raise ValueError(f"--expert-parallel splits {config.n_routed_experts} experts over --tp {layout.tp} ranks, "
                         "which does not divide them; pick a tp that divides the expert count")


def plan_layout(config: DeepseekV3Config, counts: Counts, layout: Layout) -> Plan:
    validate_layout(config, layout)
    n, c = layout.gpus, counts

    def split(stage: int) -> int:
        """Ranks a part is partitioned over: all of them from the ZeRO stage that splits it."""
        return n if layout.zero_stage >= stage else 1

    optimizer_bytes = c.muon * 4 + (c.total - c.muon) * 8 if layout.optimizer == "muonclip" else c.total * 8
    state = {"weights bf16": c.total * 2 / split(3), "master fp32": c.total * 4 / split(1),
             "grads bf16": c.total * 2 / split(2), f"{layout.optimizer} state": optimizer_bytes / split(1)}
    state = {k: v / GIB for k, v in state.items()}
    state_gib = sum(state.values())
    train = {**state, "activations": activation_bytes(config, layout.micro_batch_tokens, layout.gradient_checkpointing) / GIB,
             "runtime": RUNTIME_GIB}
    kv_per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * KV_BYTES
    rollout = {"vLLM weights": c.total * layout.rollout_bytes / layout.tp / GIB,
               "MLA absorbed": c.mla_absorbed * layout.rollout_bytes / layout.tp / GIB,
               "KV cache": layout.kv_tokens * kv_per_token / GIB,
               "trainer left": OFFLOAD_LEFT_GIB if layout.offload else state_gib,
               "runtime": RUNTIME_GIB}
    gather = c.total * 2 * (n - 1) / n / GIB if layout.zero_stage >= 3 else 0.0
    return Plan(c, layout, train, rollout, sync_gib=rollout["vLLM weights"], gather_gib=gather,
                host_gib=state_gib if layout.offload else 0.0)


def smallest_gpus(config: DeepseekV3Config, counts: Counts, layout: Layout, capacity_gib: float,
                  limit: int = 65536) -> int | None:
    """Fewest GPUs (a multiple of tp) on which both phases fit; None when none up to `limit` does
    (ZeRO 0-2 do not split the weights, and the rollout side does not shrink with more engines)."""
    for gpus in range(layout.tp, limit + 1, layout.tp):
        if plan_layout(config, counts, replace(layout, gpus=gpus)).fits(capacity_gib):
            return gpus
    return None


def smallest_tp(config: DeepseekV3Config, counts: Counts, layout: Layout, capacity_gib: float) -> int | None:
    """Fewest engine ranks (a power of two up to 64) whose ROLLOUT phase fits, whatever the trainer needs."""
    for tp in (1, 2, 4, 8, 16, 32, 64):
        if layout.expert_parallel and config.n_routed_experts % tp:
            continue
        trial = replace(layout, tp=tp, gpus=tp * math.ceil(layout.gpus / tp))
        if plan_layout(config, counts, trial).rollout_gib <= capacity_gib:
            return tp
    return None


def plan(preset: str, gpus: int, zero_stage: int, optimizer: str = "muonclip", **layout) -> Plan:
    config = DeepseekV3Config(**preset_config(preset))
    return plan_layout(config, count_parameters(config), Layout(gpus, zero_stage, optimizer, **layout))

