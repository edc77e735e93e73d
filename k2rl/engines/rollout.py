"""The rollout side of a colocated worker: vLLM's in-process `LLM`, driven with token ids only.

Why in-process: weights then move from the trainer to vLLM as a tensor hand-off in the same process
(`reload_weights` with an iterator), with no serialisation and no disk.

- `generate` takes token-id prompts and returns, per prompt, `n` `Generation`s with the sampled
  token's logprob for every generated token (vLLM's raw logprobs: the model's distribution before
  temperature / top-p, i.e. what the trainer computes for the same tokens).
- `load_weights` reloads in place from one stream of (checkpoint name, tensor). The stream may be
  lazy (a generator over the trainer's buckets): vLLM consumes it once, processing each layer as soon
  as all its tensors arrived. It must carry every weight of a layer it touches in the same call: vLLM
  re-materialises a partially loaded layer (split across two calls) with garbage in the missing part.
- `sleep` / `wake`: on a GPU, sleep mode level 2 frees weights and KV cache; `wake(("weights",))`
  then weights are pushed, then `wake(("kv_cache",))` (waking the KV cache last avoids the
  wake-up OOM). CPU vLLM has no sleep mode: the same calls only keep state, so the order of operations
  is still checked on CPU.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from k2rl.engines.compile_key import config_directory, loads_in_place
from k2rl.engines.expert_copy import copy_experts, direct_targets
from k2rl.engines.routing_at_finish import patch_routing_at_finish
from k2rl.engines.seeded_sampling import patch_seeded_sampling
from k2rl.engines.types import Generation, SamplingConfig
from k2rl.model.checkpoint import read_weights
from k2rl.model.routing import moe_layer_ids

if TYPE_CHECKING:
    from k2rl.config import ModelConfig, RolloutEngineConfig

TAGS = ("weights", "kv_cache")

# vLLM's FlashInfer top-p/top-k sampler is built with nvcc on a machine's first start, in vLLM's warm-up
# sampler run (top_p=0.9): ~2 of the ~4 minutes of a cold k2-mini start on an H100 (README, "First
# start"). k2rl's rollouts never reach it: vLLM samples requests that carry a seed (every rollout's
# does) with its own top-p, as it does at top_p=1. VLLM_USE_FLASHINFER_SAMPLER=1 opts back in.
FLASHINFER_SAMPLER_DEFAULT = "0"

# On an AMX CPU vLLM picks AMX_MLA, which only takes bf16 weights; CPU_MLA runs any dtype.
CPU_ATTENTION_BACKEND = "CPU_MLA"


def head_dtype_override(dtype: str, fp32_head: bool) -> dict:
    """LLM(...) arguments for fp32 logits from a bf16 model (vLLM's `head_dtype`, vLLM >= 0.26)."""
    return {"hf_overrides": {"head_dtype": "float32"}} if fp32_head and dtype != "float32" else {}


# Where vLLM, Inductor and Triton keep what they compile: environment variable -> subdirectory of a root
COMPILE_CACHES = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def use_compile_cache(root: str | Path) -> None:
    """Keep vLLM's, Inductor's and Triton's compiled kernels under `root` (this process and the ones it
    starts: they read the environment). A fresh machine's first start is mostly compiling (the fused
    MoE's Triton kernels, torch.compile, README "Benchmarks"); shared, it is paid once per cluster."""
    from vllm import envs

    root = Path(root).expanduser()
    os.environ.update({name: str(root / sub) for name, sub in COMPILE_CACHES.items()})
    envs.disable_envs_cache()  # vLLM freezes its environment once an engine has run in this process


def register_model_class_in_process() -> None:
    """vLLM inspects a model class it has not imported in a fresh Python subprocess (to keep CUDA out
    of the parent), cached per machine under VLLM_CACHE_ROOT: ~25 s of a fresh machine's first start
    (H100, 2026-12-06), re-importing torch and vLLM. This engine runs in-process, which imports the
    class anyway and, beside the trainer, holds CUDA already: registered as imported, vLLM inspects
    it here. Every k2rl checkpoint is `DeepseekV3ForCausalLM` (k2rl.model.checkpoint)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.deepseek_v2 import DeepseekV3ForCausalLM

    ModelRegistry.register_model("DeepseekV3ForCausalLM", DeepseekV3ForCausalLM)


class RolloutEngine:
    """One vLLM engine (in-process) on this worker's accelerator, or on the CPU."""

    def __init__(self, model_dir, *, dtype="float32", seed=0, max_model_len=2048, kv_cache_memory_bytes=256 << 20,
                 gpu_memory_utilization=0.5, enforce_eager=True, sleep_level=2, tensor_parallel_size=1,
                 expert_parallel=False, routing_replay=False, fp32_head=True, compile_cache_dir=None, weights=True):
        """With `tensor_parallel_size` > 1 this is one rank of an engine spanning that many processes of an
        existing torch.distributed world (RANK/WORLD_SIZE/MASTER_* set, consecutive ranks form an engine):
        vLLM's external launcher runs the rank in this process; every rank of the engine must get the
        same prompts and seeds (their schedulers then step in lockstep).

        With `routing_replay` every Generation carries the experts vLLM routed each position to
        (`Generation.routed_experts`, MoE layers only), for the trainer to replay. `fp32_head`: logits in
        fp32 when the model runs in bf16, as the trainer's (k2rl.model.head). `compile_cache_dir`: see
        `use_compile_cache`. `weights=False` leaves vLLM's random weights in place of the checkpoint's
        (`model_dir` may then hold the config and tokenizer alone): a compile ahead of the job
        (`k2rl prewarm`)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: tensors hand over directly
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", FLASHINFER_SAMPLER_DEFAULT)
        if compile_cache_dir is not None:
            use_compile_cache(compile_cache_dir)
        from vllm import LLM, envs

        register_model_class_in_process()

        self.on_gpu = torch.cuda.is_available()
        if routing_replay and not self.on_gpu:
            raise ValueError("rollout.routing_replay needs vLLM on a GPU (vLLM-CPU does not record the experts it "
                             "routes to); set rollout.routing_replay=false on the CPU")
        self.sleep_level = sleep_level
        self.dtype = getattr(torch, dtype)  # what the trainer exports in (`sync_weights`)
        # vLLM starts from the checkpoint's config alone, then takes its weights in place: one compile
        # serves every checkpoint of the architecture (k2rl.engines.compile_key)
        in_place = loads_in_place(model_dir)
        source = config_directory(model_dir, envs.VLLM_CACHE_ROOT, dtype) if in_place else model_dir
        # Compact JSON under a schema: without it a weak policy (self-critique) spends its whole
        # budget on whitespace between keys. xgrammar is the backend that honours the switch.
        kwargs = dict(model=str(source), load_format="dummy" if in_place or not weights else "auto", dtype=dtype,
                      seed=seed, max_model_len=max_model_len, enforce_eager=enforce_eager,
                      tensor_parallel_size=tensor_parallel_size,
                      structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
                      **head_dtype_override(dtype, fp32_head))
        if tensor_parallel_size > 1:
            # Custom all-reduce needs IPC to every GPU of the group; a Ray actor sees only its own.
            kwargs.update(distributed_executor_backend="external_launcher", enable_expert_parallel=expert_parallel,
                          disable_custom_all_reduce=True)
        if self.on_gpu:
            patch_seeded_sampling()
            if routing_replay:
                patch_routing_at_finish()
            kwargs.update(enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization,
                          enable_return_routed_experts=routing_replay)
            if kv_cache_memory_bytes is not None:
                kwargs.update(kv_cache_memory_bytes=kv_cache_memory_bytes)
        else:
            from k2rl.engines.vllm_fixes import patch_cpu_rotary, patch_cpu_shm_names

            patch_cpu_rotary()
            patch_cpu_shm_names()
            kwargs.update(kv_cache_memory_bytes=kv_cache_memory_bytes or 256 << 20,
                          attention_backend=CPU_ATTENTION_BACKEND)
        self.llm = LLM(**kwargs)
        if "hf_overrides" in kwargs and self.llm.llm_engine.model_config.head_dtype != torch.float32:
            # vLLM falls back to the model dtype with only a warning: the trainer would keep fp32 logits alone
            raise ValueError("this vLLM/platform does not run the lm_head in fp32 (model.fp32_head); set "
                             "model.fp32_head=false so that neither engine does")
        self.awake = dict.fromkeys(TAGS, True)
        self.moe_layers = moe_layer_ids(self.llm.llm_engine.model_config.hf_config) if routing_replay else None
        # Whether routed experts can skip vLLM's loaders (`load_experts`; GPU, unquantized, no EP)
        self.direct_experts = self.on_gpu and all(self.llm.collective_rpc(_can_copy_experts))
        if in_place and weights:
            self.load_weights(read_weights(model_dir, None))

    @classmethod
    def from_config(cls, model_dir, cfg: RolloutEngineConfig, model: ModelConfig, seed: int,
                    weights: bool = True) -> RolloutEngine:
        return cls(model_dir, dtype=model.dtype, fp32_head=model.fp32_head, seed=seed, max_model_len=cfg.max_model_len,
                   kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   enforce_eager=cfg.enforce_eager, sleep_level=cfg.sleep_level,
                   tensor_parallel_size=cfg.tensor_parallel_size, expert_parallel=cfg.expert_parallel,
                   routing_replay=cfg.routing_replay, compile_cache_dir=cfg.compile_cache_dir, weights=weights)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """Per prompt, `sampling.n` generations (outer list in prompt order)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        self._require_awake("generate", TAGS)
        structured = StructuredOutputsParams(json=sampling.json_schema) if sampling.json_schema else None
        params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=budget, stop_token_ids=list(sampling.stop_token_ids), seed=seed,
                                 logprobs=0, flat_logprobs=True, detokenize=False, structured_outputs=structured)
                  for budget, seed in sampling.per_prompt(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [[_generation(c, self.moe_layers) for c in out.outputs] for out in outputs]

    def sleep(self) -> None:
        """Free weights and KV cache (GPU, sleep level from config); CPU: state only."""
        if self.on_gpu and any(self.awake.values()):
            self.llm.sleep(level=self.sleep_level)
        self.awake = dict.fromkeys(TAGS, False)

    def wake(self, tags=TAGS) -> None:
        tags = [t for t in tags if not self.awake[t]]
        if self.on_gpu and tags:
            self.llm.wake_up(tags=list(tags))
        self.awake.update(dict.fromkeys(tags, True))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload in place from one (possibly lazy) stream of checkpoint-named tensors; see module doc.
        Where `direct_experts`, the stream may leave the routed experts out for `load_experts`."""
        self._require_awake("load_weights", ("weights",))
        with _expected_unloaded(experts=self.direct_experts):
            self.llm.collective_rpc(_reload_in_worker, args=(iter(named_tensors),))
        if self.awake["kv_cache"] or not self.on_gpu:
            # KV computed with the old weights may be cached. Not so on a GPU while the KV cache sleeps:
            # vLLM's sleep reset the prefix cache, and the reset walks every KV block (~100k on k2-mini:
            # 20-40 ms of a 60-120 ms sync on an H100, 2026-12-06)
            self.llm.reset_prefix_cache()

    def load_experts(self, stacks: Iterable[tuple[str, torch.Tensor]]) -> int:
        """The routed experts as the trainer's fused stacks (trainer names), this rank's block of each
        copied straight into vLLM's fused expert tensors (k2rl.engines.expert_copy); only where
        `direct_experts`, right after `load_weights` of the rest. Returns the bytes written."""
        self._require_awake("load_experts", ("weights",))
        if not self.direct_experts:
            raise RuntimeError("this engine's experts take vLLM's loader: send them through load_weights")
        # No prefix-cache reset here: load_weights saw to it (nothing ran since)
        return sum(self.llm.collective_rpc(_copy_experts_in_worker, args=(iter(stacks),)))

    def holds_device_memory(self) -> dict[str, bool]:
        """What this engine holds on the accelerator (always False on the CPU)."""
        return {tag: self.on_gpu and awake for tag, awake in self.awake.items()}

    def _require_awake(self, op: str, tags) -> None:
        asleep = [t for t in tags if not self.awake[t]]
        if asleep:
            raise RuntimeError(f"RolloutEngine.{op} needs {asleep} awake; call wake({tuple(asleep)}) first")


# vLLM's reload warns of what the stream did not carry, in two places: each layer whose weights did
# not all come ("<layer class>: Failed to load weights"), and at the end the parameter names
# ("Following weights were not loaded from checkpoint: {...}", vLLM-CPU's reload module, the GPU's
# model runner). Its loggers, by module name:
RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace",
                  "vllm.v1.worker.gpu_model_runner")
# Parameters vLLM derives after loading, in no checkpoint: MLA's absorbed up-projections
DERIVED_PARAMETERS = (".W_UK_T", ".W_UV")
ROUTED_EXPERT_PARAMETERS = (".w13_weight", ".w2_weight")  # vLLM's stacked experts, under mlp.experts


@contextmanager
def _expected_unloaded(experts: bool):
    """Silence vLLM's reload warnings for what is left out by design, only that: rotary embeddings
    (their cos/sin cache is computed), MLA's derived projections, and with `experts` the routed
    experts, which `load_experts` copies next. Otherwise a warning at every sync, and, as the engine
    loads checkpoints in place, at every start; a real omission still warns, by name."""
    expected = _DropExpected(experts)
    logs = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    for log in logs:
        log.addFilter(expected)
    try:
        yield
    finally:
        for log in logs:
            log.removeFilter(expected)


class _DropExpected(logging.Filter):
    def __init__(self, experts: bool):
        super().__init__()
        # layer classes by name ending (DeepseekScalingRotaryEmbedding)
        self.layer_kinds = ("RotaryEmbedding", "RoutedExperts") if experts else ("RotaryEmbedding",)
        self.experts = experts

    def expected(self, parameter: str) -> bool:
        return parameter.endswith(DERIVED_PARAMETERS) or (
            self.experts and ".mlp.experts." in parameter and parameter.endswith(ROUTED_EXPERT_PARAMETERS))

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "Failed to load weights" in message and record.args:
            return not str(record.args[0]).endswith(self.layer_kinds)
        if message.startswith("Following weights were not loaded") and record.args:
            unexpected = {name for name in record.args[0] if not self.expected(name)}
            record.args = (unexpected,)
            return bool(unexpected)
        return True


def _generation(completion, moe_layers: list[int] | None) -> Generation:
    token_ids = list(completion.token_ids)
    # Flat (vLLM's FlatLogprobs: a few lists per request, not a dict and a Logprob per token, which the
    # host-bound decode loop pays for in garbage collection); with logprobs=0 the sampled token's alone
    flat = completion.logprobs
    if flat.token_ids != token_ids:
        raise RuntimeError("vLLM returned logprobs for other tokens than it sampled")
    logprobs = flat.logprobs
    routed = None
    if moe_layers is not None:  # vLLM's array is [positions, all decoder layers, top_k]
        routed = torch.from_numpy(completion.routed_experts[:, moe_layers].astype("int16"))
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=completion.finish_reason,
                      routed_experts=routed)


def _can_copy_experts(worker) -> bool:
    return bool(direct_targets(worker.model_runner.model))


def _copy_experts_in_worker(worker, stacks) -> int:
    return copy_experts(direct_targets(worker.model_runner.model), stacks)


def _reload_in_worker(worker, named_tensors) -> None:
    """vLLM's in-place reload, plus the CPU MoE re-pack that vLLM 0.32 skips on reload.

    On CPU, fused experts are pre-packed into the grouped-gemm layout only when the MoE kernel is first
    built; a reload leaves them in checkpoint layout, which the kernel then misreads (measured: logprob
    gap to the trainer grows from 4e-3 to 7e-2 after one reload). We re-pack the expert layers the stream
    touched.
    """
    touched: set[str] = set()

    def tracked():
        for name, tensor in named_tensors:
            if ".mlp.experts." in name:
                touched.add(name.split(".mlp.experts.")[0] + ".mlp.experts.routed_experts")
            yield name, tensor

    worker.reload_weights(weights_iterator=tracked())
    if torch.cuda.is_available():
        return
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import cpu_prepack_moe_weight
    from vllm.model_executor.utils import replace_parameter

    for name, module in worker.model_runner.model.named_modules():
        if name in touched:
            experts = module.quant_method.moe_kernel.fused_experts
            for weight in ("w13_weight", "w2_weight"):
                replace_parameter(module, weight, cpu_prepack_moe_weight(getattr(module, weight), experts.isa))
