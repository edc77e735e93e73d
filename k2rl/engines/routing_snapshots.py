"""vLLM 0.26's routing replay without its per-step copy of every request's KV block ids.

Why: with `enable_return_routed_experts`, vLLM 0.26's scheduler copies the block ids of every request
it schedules, every step (`Scheduler._update_after_schedule`), so that a prompt's routing can still be
read from the slot buffer when its prefill completes, even if async scheduling has freed its blocks by
then. It reads a copy only then (`update_from_output`, for a request that has no output token yet);
a decoding request's copy is dropped unread. With 256 rollouts decoding that is 256 block lists built
in Python per decoding step, host time that plain vLLM does not spend. Here only requests without an
output token are copied: the ones whose copy can be read. The routing returned is the same.
vLLM 0.32 gathers routing at the request's end instead (its aux-output connector); the patch applies
only to a scheduler that reads its copies as 0.26's does (`copies_every_step`).
"""
from __future__ import annotations

import functools
import inspect


def copies_every_step(scheduler_cls) -> bool:
    """Whether this vLLM's scheduler copies block ids for every scheduled request and reads them only
    for a request that had no output token (0.26's `_re_block_ids`)."""
    try:
        snapshot = inspect.getsource(scheduler_cls._update_after_schedule)
        read = inspect.getsource(scheduler_cls.update_from_output)
    except (AttributeError, OSError, TypeError):
        return False
    return ("self._re_block_ids.update(" in snapshot and "for rid in num_scheduled_tokens" in snapshot
            and "self._re_block_ids.pop(req_id" in read and "if num_output_tokens_before == 0:" in read)


def patch_routing_snapshots() -> bool:
    """Copy block ids only for the requests whose prompt routing is still to be read; returns whether
    this vLLM's scheduler is patched (False where it has no per-step copy to spare)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    stock = Scheduler._update_after_schedule
    if getattr(stock, "_k2rl_patched", False):
        return True
    if not copies_every_step(Scheduler):
        return False

    @functools.wraps(stock)
    def _update_after_schedule(self, scheduler_output) -> None:
        replay = self.enable_return_routed_experts
        self.enable_return_routed_experts = False  # the stock copy of every scheduled request's block ids
        try:
            stock(self, scheduler_output)
        finally:
            self.enable_return_routed_experts = replay
        if replay:
            group = self.routed_experts_mgr.attn_gid
            for rid in scheduler_output.num_scheduled_tokens:
                if not self.requests[rid].num_output_tokens:  # its prompt's routing is read once its prefill completes
                    self._re_block_ids[rid] = self.kv_cache_manager.get_blocks(rid).get_block_ids()[group]

    _update_after_schedule._k2rl_patched = True
    Scheduler._update_after_schedule = _update_after_schedule
    return True
