"""The driver's share of the next step, made on a thread while the workers run this one.

An SFT step's data is the driver's work (the oracle's dialogs of fresh tasks: ~0.07 s for 32 on one
core), and the step waits for it: on the GPU demo's 0.6 s steps that was 0.07 s of 0.67. `Ahead`
starts the next step's share when this step's is taken, so it runs while the driver waits on the
workers. The work must touch nothing the driver's own thread uses meanwhile (the oracle reads the task
stream, environments of its own and the tokenizer; the driver, during a step, only the workers).

A checkpoint must not skip what was made ahead: `mark()` is the state read just before the work in
flight started (the task cursor), which a resumed run starts from, so it makes that work again.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Ahead(Generic[T]):
    def __init__(self, make: Callable[[], T], mark: Callable[[], object]):
        self._make, self._mark = make, mark
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2rl-ahead")
        self._in_flight: tuple[object, Future[T]] | None = None

    def take(self, more: bool) -> T:
        """The next result (made here if none is in flight); with `more`, start the one after it."""
        result = self._in_flight[1].result() if self._in_flight else self._make()
        self._in_flight = None
        if more:
            self._in_flight = (self._mark(), self._pool.submit(self._make))
        return result

    def mark(self) -> object:
        """What a checkpoint records: the mark from before the work in flight, else the current one."""
        return self._in_flight[0] if self._in_flight else self._mark()

    def settle(self) -> None:
        """Wait for the work in flight (kept for `take`), before the driver uses what it uses."""
        if self._in_flight:
            self._in_flight[1].exception()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._in_flight = None
