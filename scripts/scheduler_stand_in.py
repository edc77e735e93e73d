"""vLLM's scheduler (async, as the RolloutEngine runs it) driven step by step by a stand-in model runner:
no model and no GPU, only the scheduler's own bookkeeping, which is what k2rl.engines.routing_at_finish
patches. Used by tests/test_routing_at_finish.py (preemptions on demand, a request preempted at its
last step among them) and scripts/bench_routing_host.py (the scheduler's host time a step).
Needs a vLLM whose scheduler stores routing as 0.26's does (`reads_routing_per_step`)."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

BLOCK = 16  # KV positions a block


def make_scheduler(model_dir, max_running: int, max_batched_tokens: int, num_blocks: int, max_model_len: int,
                   replay: bool = True):
    """An async scheduler, routing replay on unless `replay` is False, `num_blocks` KV blocks, prefix
    caching off (the stand-in hashes no blocks)."""
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model = ModelConfig(model=str(model_dir), dtype="bfloat16", max_model_len=max_model_len,
                        skip_tokenizer_init=True, enable_return_routed_experts=replay)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=False)
    cache.num_gpu_blocks = num_blocks
    config = VllmConfig(model_config=model, cache_config=cache, scheduler_config=SchedulerConfig(
        max_num_seqs=max_running, max_num_batched_tokens=max_batched_tokens, max_model_len=max_model_len,
        enable_chunked_prefill=True, is_encoder_decoder=False),
        **({} if torch.cuda.is_available() else {"device_config": DeviceConfig("cpu")}))
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["attn"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=64, dtype=torch.bfloat16))])
    return AsyncScheduler(vllm_config=config, kv_cache_config=kv, log_stats=False, block_size=BLOCK,
                          structured_output_manager=StructuredOutputManager(config))


class Run:
    """What one drive returned: each request's routing arrays as vLLM emitted them, the requests
    preempted, those that finished while preempted (blocks already freed), and the scheduler's own
    seconds (`schedule` + `update_from_output`) over `steps` steps."""

    def __init__(self):
        self.rows: dict[str, list[np.ndarray]] = {}
        self.preempted: set[str] = set()
        self.finished_preempted: set[str] = set()
        self.scheduler_seconds = 0.0
        self.steps = 0


def drive(scheduler, prompts: list[list[int]], max_tokens: list[int],
          routing: Callable[[list[tuple[str, int, int]]], np.ndarray] | None) -> Run:
    """Requests "0".."n-1" through `scheduler` until all finish. Per step the stand-in runner answers with
    `routing([(request id, first position, count), ...])` (a row per scheduled position; none where
    `routing` is None, replay off) and a sampled token per request past its prefill; each step's output
    reaches the scheduler after the next step is scheduled, as with async scheduling."""
    from vllm import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput, RoutedExpertsLists
    from vllm.v1.request import Request

    run = Run()
    requests = {str(i): Request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0), None)
                for i, (prompt, n) in enumerate(zip(prompts, max_tokens))}
    for request in requests.values():
        scheduler.add_request(request)
    preempt, free = scheduler._preempt_request, scheduler._free_request  # bound: stock or patched

    def preempt_counted(request, timestamp):
        run.preempted.add(request.request_id)
        preempt(request, timestamp)

    def free_counted(request, *args, **kwargs):
        if request.num_computed_tokens == 0:  # preempted and not resumed: its blocks are freed
            run.finished_preempted.add(request.request_id)
        return free(request, *args, **kwargs)

    scheduler._preempt_request, scheduler._free_request = preempt_counted, free_counted

    def deliver(step) -> None:
        start = time.perf_counter()
        outputs = scheduler.update_from_output(*step)
        run.scheduler_seconds += time.perf_counter() - start
        for client_outputs in outputs.values():
            for output in client_outputs.outputs:
                if output.routed_experts is not None:
                    run.rows.setdefault(output.request_id, []).append(output.routed_experts)

    in_flight = []
    while scheduler.has_requests():
        start = time.perf_counter()
        scheduled = scheduler.schedule()
        run.scheduler_seconds += time.perf_counter() - start
        run.steps += 1
        ids = list(scheduled.num_scheduled_tokens)
        spans, slots = [], []
        for rid in ids:
            request, count = requests[rid], scheduled.num_scheduled_tokens[rid]
            first = request.num_computed_tokens - count  # already advanced by the schedule
            spans.append((rid, first, count))
            block_ids = np.array(scheduler.kv_cache_manager.get_blocks(rid).get_block_ids()[0])
            positions = np.arange(first, first + count)
            slots.append(block_ids[positions // BLOCK] * BLOCK + positions % BLOCK)
        sampled = [[] if requests[rid].is_prefill_chunk else [requests[rid].num_computed_tokens % 900 + 5]
                   for rid in ids]
        in_flight.append((scheduled, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={rid: k for k, rid in enumerate(ids)}, sampled_token_ids=sampled,
            routed_experts=RoutedExpertsLists(routing(spans), np.concatenate(slots)) if ids and routing else None)))
        if len(in_flight) > 1:
            deliver(in_flight.pop(0))
    for step in in_flight:
        deliver(step)
    return run
