"""vLLM 0.26's routing replay, read once per request as it finishes instead of sliced out every step.

Why: with `enable_return_routed_experts`, vLLM 0.26 stores each step's routing in a slot buffer (a row
per KV slot, `RoutedExpertsManager`), and besides, per request and step, copies the request's block
ids (`Scheduler._update_after_schedule`), slices its new rows out of the step's routing
(`update_from_output`) and appends them to a list in the output processor, joined at the end. With 256
rollouts decoding, that is host work that plain vLLM does not do, in a decode loop bound by host time.
The slot buffer already holds every position's routing for as long as the request holds its blocks:
here it is read once, just before a finished request frees them, as vLLM 0.32 gathers routing at the
end. The rows are stock vLLM's, with one difference: a request that was preempted and recomputed gets
the recompute's rows, which at near-ties may differ from the routing its earlier tokens were sampled
with (stock keeps those). A request preempted after its last step and finished before it resumed is
read from the block ids it held (kept at preemption, as stock keeps them for its prompt reads).
Scope: finishes decided in the engine core (stop tokens, max_tokens), the only ones the RolloutEngine
asks for; a stop string ends a request in the front end, which then gets no routing.
The patch applies only where the scheduler works as 0.26's does (`reads_routing_per_step`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

# The Scheduler methods the patch replaces (a test or bench that patches and unpatches restores these)
PATCHED_METHODS = ("_update_after_schedule", "update_from_output", "_free_request", "_preempt_request")


def reads_routing_per_step(scheduler_cls) -> bool:
    """Whether this vLLM's scheduler copies block ids and slices routing per request and step, behind
    `enable_return_routed_experts`, and frees finished and preempted requests where the patch hooks in."""
    try:
        snapshot = inspect.getsource(scheduler_cls._update_after_schedule)
        step = inspect.getsource(scheduler_cls.update_from_output)
        free = inspect.getsource(scheduler_cls._free_request)
        preempt = inspect.getsource(scheduler_cls._preempt_request)
    except (AttributeError, OSError, TypeError):
        return False
    return ("if self.enable_return_routed_experts:" in snapshot and "self._re_block_ids.update(" in snapshot
            and "self.routed_experts_mgr.store_batch(" in step and "self.enable_return_routed_experts" in step
            and "self._free_request(request" in step and "routed_experts=routed_experts" in step
            and "self._free_blocks(request)" in free and "self._free_request_blocks(request)" in preempt)


def patch_routing_at_finish() -> bool:
    """Read each finished request's routing from the slot buffer, once; returns whether this vLLM's
    scheduler is patched (False where it does not slice routing per step)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler.update_from_output, "_k2rl_patched", False):
        return True
    if not reads_routing_per_step(Scheduler):
        return False
    stock_after_schedule = Scheduler._update_after_schedule
    stock_update = Scheduler.update_from_output
    stock_free = Scheduler._free_request
    stock_preempt = Scheduler._preempt_request

    @functools.wraps(stock_after_schedule)
    def _update_after_schedule(self, scheduler_output) -> None:
        with _per_step_routing_off(self):  # no block-id copies: a finished request's own blocks are read
            stock_after_schedule(self, scheduler_output)

    @functools.wraps(stock_update)
    def update_from_output(self, scheduler_output, model_runner_output):
        if not self.enable_return_routed_experts:
            return stock_update(self, scheduler_output, model_runner_output)
        # the step's routing still goes into the slot buffer (stock stores it whether or not the flag is on)
        self._k2rl_finished_routing = finished = {}
        try:
            with _per_step_routing_off(self):
                outputs = stock_update(self, scheduler_output, model_runner_output)
        finally:
            self._k2rl_finished_routing = None
        if finished:
            for client_outputs in outputs.values():
                for output in client_outputs.outputs:
                    if output.finish_reason is not None and output.request_id in finished:
                        output.routed_experts = finished[output.request_id]
        return outputs

    @functools.wraps(stock_free)
    def _free_request(self, request, *args, **kwargs):
        kept = getattr(self, "_re_block_ids", {}).pop(request.request_id, None)  # the dict is there with replay on
        finished = getattr(self, "_k2rl_finished_routing", None)
        if finished is not None:  # finished in a step (`update_from_output`), not aborted
            finished[request.request_id] = _routing_of(self, request, kept)
        return stock_free(self, request, *args, **kwargs)

    @functools.wraps(stock_preempt)
    def _preempt_request(self, request, timestamp) -> None:
        if hasattr(self, "_re_block_ids"):  # replay on; its rows stay in the slot buffer until its blocks are reused
            self._re_block_ids[request.request_id] = _block_ids(self, request)
        stock_preempt(self, request, timestamp)

    for name, patched in zip(PATCHED_METHODS, (_update_after_schedule, update_from_output, _free_request,
                                               _preempt_request)):
        patched._k2rl_patched = True
        setattr(Scheduler, name, patched)
    return True


@contextlib.contextmanager
def _per_step_routing_off(scheduler):
    """Within it, the scheduler skips its per-request routing work (its flag reads False)."""
    replay = scheduler.enable_return_routed_experts
    scheduler.enable_return_routed_experts = False
    try:
        yield
    finally:
        scheduler.enable_return_routed_experts = replay


def _block_ids(scheduler, request) -> list[int]:
    return scheduler.kv_cache_manager.get_blocks(request.request_id).get_block_ids()[scheduler.routed_experts_mgr.attn_gid]


def _routing_of(scheduler, request, kept_block_ids: list[int] | None):
    """Every forwarded position's routing (all but the last sampled token's), from the slot buffer: stock's
    rows, the prompt's (from `routed_experts_prompt_start` where set) then one per decoding step."""
    manager = scheduler.routed_experts_mgr
    positions = request.num_tokens - 1
    block_ids = _block_ids(scheduler, request)
    if len(block_ids) * manager.block_size < positions and kept_block_ids is not None:
        block_ids = kept_block_ids  # preempted after its last step: its blocks are freed but not yet reused
    params = request.sampling_params
    start = (params.routed_experts_prompt_start or 0) if params is not None else 0
    return manager.get(block_ids, positions, token_start=start)
