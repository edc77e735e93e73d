"""The training side of a colocated worker: the K2 trainer model under DeepSpeed (ZeRO 1, 2 or 3).

Batches are `TokenBatch`es (k2rl.engines.types). Everything per token is aligned with
`input_ids`: entry t belongs to token t, and a logprob at t is log p(token t | tokens < t), so
position 0 has no logprob (0.0) and must be masked out. Logprobs are computed at the batch's
`loss_mask` tokens only; the others are 0.0.

An RL loss is a function of the new policy's logprobs and the batch:

    def loss_fn(new_logprobs: list[Tensor], batch: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        # new_logprobs[i]: [len(batch.input_ids[i])], differentiable, aligned as above
        ...return loss (the mean over this micro-batch's loss tokens), stats

`loss_fn` gets the micro-batch on the trainer's device. `train_step` splits the batch into micro-batches of at most `train.micro_batch_tokens` padded tokens,
calls `loss_fn` on each, weights each micro-batch by its share of the batch's loss tokens (so the
gradient is the one of the token mean over the whole batch), accumulates, clips, steps the optimizer
(then QK-Clip with MuonClip) and returns stats averaged over data-parallel ranks.

Ranks: every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively),
so a rank with fewer micro-batches runs extra ones with weight zero.
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from k2rl.config import JobConfig, OptimizerConfig
from k2rl.engines.offload import PinnedOffloader
from k2rl.engines.types import ROUTED_EXPERTS, TokenBatch, concat_batches, is_routed_expert
from k2rl.model.checkpoint import load_model, save_weights, write_config
from k2rl.model.expert_load import ExpertLoad
from k2rl.model.experts import set_experts_implementation
from k2rl.model.head import use_fp32_logits
from k2rl.model.modeling import head_max_logits, reset_max_logits, to_checkpoint_names, trainable_state
from k2rl.model.routing import Replay, replay_routing
from k2rl.model.shared_prefix import padded_logprobs, shared_prefix_length


LossFn = Callable[[list[torch.Tensor], TokenBatch], tuple[torch.Tensor, dict[str, float]]]


def fp32_master(job: JobConfig) -> bool:
    """MuonClip steps (and QK-Clip rescales) fp32 master weights it holds itself, so the model stays
    fp32 and computes in bf16 under DeepSpeed's torch_autocast on a GPU; DeepSpeed's bf16 mode would
    keep hidden fp32 copies that undo the clip. AdamW lets DeepSpeed run bf16 with its own fp32 copy."""
    return job.optimizer.name == "muonclip"


def ds_config(job: JobConfig, on_gpu: bool) -> dict:
    """DeepSpeed config: one micro-batch per `backward`; we mark the accumulation boundary ourselves."""
    stage = job.train.zero_stage
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": job.train.grad_clip,
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "bf16": {"enabled": on_gpu and not fp32_master(job)},
        "torch_autocast": {"enabled": on_gpu and fp32_master(job), "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def build_optimizer(model: torch.nn.Module, job: JobConfig, device: torch.device) -> torch.optim.Optimizer:
    """MuonClip from `k2rl.optim` when configured and present, else torch AdamW; `device`: where the
    model will train (it is still on the host here: DeepSpeed moves it)."""
    cfg = job.optimizer
    if cfg.name == "muonclip":
        if importlib.util.find_spec("k2rl.optim") is None:
            raise RuntimeError("optimizer.name 'muonclip' needs k2rl.optim, which is not installed; use 'adamw'")
        from k2rl.optim import build_optimizer as build_muonclip

        return build_muonclip(model, cfg, device=device)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def mark_experts_as_zero3_leaves(model: torch.nn.Module) -> None:
    """ZeRO-3 requires every rank to run the same submodules in the same order, but fused MoE experts
    call their activation once per expert hit, which differs between ranks with different tokens. As
    ZeRO-3 leaves the experts gather their weights once on entry and are not traced inside."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = list({type(m) for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter)})
    if classes:
        set_z3_leaf_modules(model, classes)


def keep_freed_memory_in_heap() -> None:
    """glibc's malloc serves every allocation over its mmap threshold (dynamic, at most 32 MB) with a
    fresh mapping and unmaps it on free, and trims the heap top, so on the CPU a train step faults in
    and zeroes its large activations anew each time (a k2-tiny SFT step: ~150k page faults, 10-14% of
    its CPU time in the kernel). With both thresholds at their maximum, freed memory stays in the heap and
    is reused; the process keeps its peak footprint. Process-wide; a no-op without glibc's mallopt."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        mallopt(m_trim_threshold, 2**31 - 1)
        mallopt(m_mmap_threshold, 2**31 - 1)


class TrainEngine:
    """DeepSpeed over the trainer model; one data-parallel rank (rank/world from torch.distributed env)."""

    def __init__(self, model_dir, job_cfg: JobConfig, model: torch.nn.Module | None = None, reference_dir=None):
        """`model`: an already-built trainer model for `model_dir` (benchmarks build one on the GPU).
        `reference_dir`: a frozen reference policy for the KL term (kept on the host between uses)."""
        import deepspeed

        self.model_dir = Path(model_dir)
        self.job = job_cfg
        self.on_gpu = torch.cuda.is_available()
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if self.on_gpu else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        if not self.on_gpu:
            keep_freed_memory_in_heap()
        if model is None:
            low_precision = self.on_gpu and not fp32_master(job_cfg)
            model = load_model(model_dir, torch.bfloat16 if low_precision else torch.float32)
        self._compute_as_configured(model)
        if job_cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if job_cfg.train.zero_stage == 3:
            mark_experts_as_zero3_leaves(model)
        optimizer = build_optimizer(model, job_cfg, self.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(job_cfg.optimizer, job_cfg.schedule.steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(job_cfg, self.on_gpu))
        self.model = self.engine.module
        self.expert_load = ExpertLoad(self.model)
        if self.world == 1 and job_cfg.train.zero_stage == 0:
            # Without ZeRO, DeepSpeed all-reduces the gradients at every boundary by flattening them into
            # buckets and copying them back, even for a world of one: passes over every gradient that
            # leave it as it was. (Under ZeRO the optimizer's reduce moves gradients into its partitions.)
            self.engine.enable_backward_allreduce = False
        self.zero3 = job_cfg.train.zero_stage == 3
        self.client_optimizer = optimizer
        if job_cfg.train.zero_stage and hasattr(optimizer, "attach_zero"):
            optimizer.attach_zero(self.optimizer)  # MuonClip learns where ZeRO put each matrix
        self.offloader = PinnedOffloader(self.engine) if self.on_gpu and job_cfg.train.offload == "pinned" else None
        self.offloaded = False
        self.reference = None
        if reference_dir is not None:
            self.reference = load_model(reference_dir, next(self.model.parameters()).dtype).eval().requires_grad_(False)
            self._compute_as_configured(self.reference)

    def _compute_as_configured(self, model: torch.nn.Module) -> None:
        """How the job's models compute (the experts' GEMMs, the logits' dtype): the policy and the KL
        reference alike, or the KL term starts at their difference instead of 0."""
        set_experts_implementation(model, self.job.train.experts_implementation, self.device)
        if self.job.model.fp32_head:
            use_fp32_logits(model)

    # ---- forward ---------------------------------------------------------------------------------
    def _forward_logprobs(self, mb: TokenBatch, module=None, replay: Replay | None = None) -> list[torch.Tensor]:
        """Per-sequence logprobs of each loss-mask token given its prefix (0.0 at the others: no loss reads
        them, so the vocabulary projection skips them), right-padded batch; under the policy (the
        DeepSpeed engine) unless another `module` is given. A prefix all sequences share is run once
        (k2rl.model.shared_prefix); `replay` is the block's routing replay, if any."""
        lengths = [len(s) for s in mb.input_ids]
        ids = torch.nn.utils.rnn.pad_sequence(mb.input_ids, batch_first=True).to(self.device)
        attn = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long().to(self.device)
        wanted = torch.nn.utils.rnn.pad_sequence(mb.loss_mask, batch_first=True).to(self.device)
        logp = padded_logprobs(module or self.engine, ids, attn, self._shared_prefix(mb), replay, wanted)
        return [logp[i, :n] for i, n in enumerate(lengths)]

    def _shared_prefix(self, batch: TokenBatch) -> int:
        """Leading tokens to run once for the whole batch (0: none). Off under gradient checkpointing, and
        under ZeRO-3, whose hooks reduce a module's gradient once per call (a module run twice: twice)."""
        if not self.job.train.shared_prefix or self.model.is_gradient_checkpointing or self.zero3:
            return 0
        return shared_prefix_length(batch.input_ids, batch.token_data.get(ROUTED_EXPERTS))

    def _replayed_routing(self, mb: TokenBatch, module=None):
        """A context in which `module` (default: the policy) routes `mb`'s tokens as vLLM did, when the
        batch carries vLLM's routing (k2rl.model.routing); it must also span the backward pass, where
        gradient checkpointing runs the routers again. Yields the Replay (None without routing)."""
        routed = mb.token_data.get(ROUTED_EXPERTS)
        if routed is None:
            return nullcontext()
        padded = torch.nn.utils.rnn.pad_sequence(routed, batch_first=True, padding_value=-1).to(self.device)
        return replay_routing(module or self.model, padded)

    def _aligned_micro_batches(self, batch: TokenBatch) -> list[tuple[TokenBatch, bool]]:
        """This rank's micro-batches, padded with weight-zero repeats to the largest count of any rank."""
        mbs = batch.micro_batches(self.job.train.micro_batch_tokens, self._shared_prefix(batch)) if len(batch) else []
        count = torch.tensor([len(mbs)], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        filler = mbs[0].select([0]) if mbs else TokenBatch.from_lists([[0, 0]])
        return [(mb, True) for mb in mbs] + [(filler, False)] * (int(count) - len(mbs))

    def logprobs(self, batch: TokenBatch) -> list[torch.Tensor]:
        """Per-sequence per-token logprobs under the current policy (no grad), aligned with input_ids."""
        self._require_loaded("logprobs")
        self.engine.eval()
        out = self._no_grad_logprobs(batch, self.engine)
        reset_max_logits(self.model)
        return out

    def reference_logprobs(self, batch: TokenBatch) -> list[torch.Tensor]:
        """The same under the frozen reference policy (the KL term's anchor); it visits the device only
        for this call."""
        if self.reference is None:
            raise RuntimeError("no reference policy: the engine was built without reference_dir")
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        self.reference.to(self.device)
        try:
            # The policy's forward runs in the engine's autocast; the reference, called outside the engine,
            # enters the same one, or the KL term starts at their rounding gap, not 0.
            with autocast_if_enabled(self.engine):
                return self._no_grad_logprobs(batch, self.reference)
        finally:
            self.reference.to("cpu")

    def _no_grad_logprobs(self, batch: TokenBatch, module) -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for mb, real in self._aligned_micro_batches(batch):
                with self._replayed_routing(mb, module) as replay:
                    logps = self._forward_logprobs(mb, module, replay)
                if real:
                    out += [lp.float().cpu() for lp in logps]
        return out

    # ---- step ------------------------------------------------------------------------------------
    def train_step(self, batches: TokenBatch | list[TokenBatch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over all sequences given (see module doc for the loss contract)."""
        self._require_loaded("train_step")
        batch = concat_batches(batches) if isinstance(batches, list) else batches
        total = max(batch.num_loss_tokens(), 1)
        self.engine.train()
        reset_max_logits(self.model)
        mbs = self._aligned_micro_batches(batch)
        sums: dict[str, float] = {}
        grad_norm = None
        for i, (mb, real) in enumerate(mbs):
            weight = mb.num_loss_tokens() / total if real else 0.0
            mb = mb.to(self.device)
            last = i == len(mbs) - 1
            with self._replayed_routing(mb) as replay:
                loss, stats = loss_fn(self._forward_logprobs(mb, replay=replay), mb)
                self.engine.set_gradient_accumulation_boundary(last)
                self.engine.backward(loss * weight, scale_wrt_gas=False)
            if last and self.job.train.zero_stage == 0:  # DeepSpeed reports no norm without ZeRO
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            self.engine.step()
            for k, v in {"loss": float(loss.detach()), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm() or 0.0
        return {**self._reduce_mean(sums), "grad_norm": float(grad_norm), **self._after_step()}

    def _after_step(self) -> dict[str, float]:
        """lr, the routed experts' load (summed over ranks), max attention logit (max over ranks) and
        QK-Clip, after the optimizer step."""
        stats = {"lr": self.scheduler.get_last_lr()[0], **self.expert_load.take(
            reduce=dist.all_reduce, bias_update=self.job.optimizer.router_bias_update)}
        head_max = head_max_logits(self.model)
        if head_max is not None:
            head_max = head_max.detach().clone()
            dist.all_reduce(head_max, op=dist.ReduceOp.MAX)
            stats["attn/max_logit"] = float(head_max.max())
        opt = self.job.optimizer
        if opt.name == "muonclip" and opt.qk_clip:
            from k2rl.optim import apply_qk_clip

            clip = apply_qk_clip(self.model, opt.qk_clip_tau, optimizer=self.client_optimizer)
            stats.update({k: float(v) for k, v in clip.items()})
        reset_max_logits(self.model)
        return stats

    def _reduce_mean(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return {k: float(v) / self.world for k, v in zip(keys, values.tolist())}

    # ---- weights out -----------------------------------------------------------------------------
    def export_weights(self, bucket_bytes: int, dtype: torch.dtype | None = None,
                       select: Callable[[str], bool] | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Buckets of full tensors in checkpoint names, in `dtype` (the rollout's; None: as trained);
        ZeRO-3 gathers one bucket's parameters at a time. `select` keeps the trainer's parameters whose
        name it accepts (the same on every rank).

        All ranks must iterate to the end together (the ZeRO-3 gathers are collective). In the weights'
        own dtype a bucket's tensors are views of the live weights (ZeRO-3: copies, valid after the next
        bucket is gathered). In another dtype (fp32 master -> bf16 vLLM) each bucket is cast straight
        from the trainer's buffers into one fresh flat buffer of at most `bucket_bytes`, so the sync
        moves half the bytes and holds about one bucket beyond the weights. The router's correction
        bias stays in the trainer's precision: vLLM keeps it in fp32.
        """
        for group in self._param_groups(bucket_bytes, dtype, select):
            named = to_checkpoint_names(group)  # lazy: read in _bucket, under the ZeRO-3 gather
            if self.zero3:
                import deepspeed

                params = [t for _, t in group if hasattr(t, "ds_id")]
                with deepspeed.zero.GatheredParameters(params):
                    yield _bucket(named, dtype, always_copy=True)
            else:
                yield _bucket(named, dtype, always_copy=False)

    def _param_groups(self, bucket_bytes: int, dtype: torch.dtype | None,
                      select: Callable[[str], bool] | None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The trainer's tensors in groups of at most `bucket_bytes` once exported (a larger one alone)."""
        group, size = [], 0
        for name, tensor in trainable_state(self.model):
            if select is not None and not select(name):
                continue
            numel = tensor.ds_numel if hasattr(tensor, "ds_numel") else tensor.numel()
            nbytes = numel * _export_dtype(name, tensor, dtype).itemsize
            if group and size + nbytes > bucket_bytes:
                yield group
                group, size = [], 0
            group.append((name, tensor))
            size += nbytes
        if group:
            yield group

    def expert_stacks(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The routed experts as the trainer holds them, one fused stack per projection and MoE layer
        (`...mlp.experts.gate_up_proj` [E, 2I, H], `...down_proj` [E, H, I]): views of the live weights
        in their own dtype, for a rollout engine that copies (and casts) its share of each straight
        into its own tensors (k2rl.engines.expert_copy). Under ZeRO-3 each is gathered whole while the
        consumer holds it; all ranks must iterate to the end together."""
        for name, param in self.model.named_parameters():
            if not is_routed_expert(name):
                continue
            if self.zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([param]):
                    yield name, param.detach()
            else:
                yield name, param.detach()

    # ---- offload ---------------------------------------------------------------------------------
    def release_cached_memory(self) -> None:
        """Hand the allocator's cached blocks (the last step's activations, up to the step's peak) back
        to the device: the rollout engine wakes its weights beside the trainer's live state for the
        sync, and on an 80 GB card the cache of a 16k-token k2-mini step left no room for them."""
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def offload(self) -> None:
        """Move parameters, gradients and optimizer state off the accelerator (CPU: state only)."""
        if self.on_gpu and not self.offloaded:
            if self.offloader is not None:
                self.offloader.offload()
            elif self.job.train.offload == "deepspeed":
                self.engine.offload_states(pin_memory=True, non_blocking=True)
            self.release_cached_memory()
        self.offloaded = True

    def reload(self) -> None:
        if self.on_gpu and self.offloaded:
            if self.offloader is not None:
                self.offloader.reload()
            elif self.job.train.offload == "deepspeed":
                self.engine.reload_states(non_blocking=True)
            torch.cuda.synchronize()
        self.offloaded = False

    def holds_device_memory(self) -> bool:
        return self.on_gpu and not self.offloaded

    def _require_loaded(self, op: str) -> None:
        if self.offloaded:
            raise RuntimeError(f"TrainEngine.{op} while offloaded: call reload() first")

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, out_dir, training_state: bool = True) -> None:
        """`out_dir`: the model in HF layout (loadable by vLLM and `load_model`) + `deepspeed/` state
        (optimizer, fp32 master weights) unless `training_state` is off."""
        self._require_loaded("save_checkpoint")
        out_dir = Path(out_dir)
        named = (pair for bucket in self.export_weights(self.job.rollout.weight_bucket_bytes) for pair in bucket)
        if self.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.model.config, out_dir, next(self.model.parameters()).dtype)
            save_weights(named, out_dir)
            for f in self.model_dir.glob("*token*"):
                shutil.copy(f, out_dir / f.name)
        else:
            for _ in named:  # take part in the collective gathers
                pass
        if training_state:
            self.engine.save_checkpoint(str(out_dir / "deepspeed"), tag="state")
        dist.barrier()

    def load_checkpoint(self, ckpt_dir) -> None:
        self._require_loaded("load_checkpoint")
        self.engine.load_checkpoint(str(Path(ckpt_dir) / "deepspeed"), tag="state")


def _export_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a weight leaves the trainer in: `dtype`, except the router's correction bias."""
    return tensor.dtype if dtype is None or name.endswith("e_score_correction_bias") else dtype


def _bucket(named, dtype: torch.dtype | None, always_copy: bool) -> list[tuple[str, torch.Tensor]]:
    """One bucket's tensors: views of the weights where nothing needs casting or copying, else views
    of one flat buffer per dtype the weights are cast/copied into."""
    named = [(n, t.detach()) for n, t in named]
    targets = [_export_dtype(n, t, dtype) for n, t in named]
    if not always_copy and all(t.dtype == d for (_, t), d in zip(named, targets)):
        return named
    flats = {d: torch.empty(sum(t.numel() for (_, t), td in zip(named, targets) if td == d), dtype=d,
                            device=named[0][1].device) for d in set(targets)}
    offsets = dict.fromkeys(flats, 0)
    out = []
    for (name, tensor), d in zip(named, targets):
        view = flats[d][offsets[d]:offsets[d] + tensor.numel()].view(tensor.shape)
        view.copy_(tensor)
        offsets[d] += tensor.numel()
        out.append((name, view))
    return out


def lr_multiplier(opt: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """lr factor at optimizer step s: linear warmup over `warmup_steps`, then `decay` from 1 down to
    `min_lr_ratio` at `total_steps` (held there after)."""
    def at(step: int) -> float:
        if step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.decay == "constant":
            return 1.0
        progress = min(1.0, (step - opt.warmup_steps) / max(1, total_steps - opt.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if opt.decay == "cosine" else 1 - progress
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * shape
    return at
