"""Python's garbage collector during training: measured always, run by hand with --manual-gc.

The automatic collector starts a full pass once enough new long-lived objects have built up, at
a moment of each rank's own, and every other rank then waits for that rank in the next
collective. A full pass over the tiny model's trainer process (~440,000 objects, mostly torch's
and megatron's) took 0.27 s on 2 CPU cores (docs/BENCHMARKS.md); at hundreds of ranks one of
them is collecting far more often than any single one.

Megatron-LM's --manual-gc turns the automatic collector off and collects at the same iterations
on every rank: every --manual-gc-interval iterations (0: never during training; reference counting
still frees all garbage that is not a cycle), and around each evaluation unless
--no-manual-gc-eval. Either way the interval's time in collections and their count are logged
(time/gc_sec, gc/collections), so a run shows whether its collector matters.
"""
from __future__ import annotations

import gc
import time
from typing import Optional, Tuple


class GarbageCollection:
    """Use as a context manager around the training loop."""

    def __init__(self, manual: bool = False, interval: int = 0, around_eval: bool = True):
        self.manual, self.interval, self.around_eval = manual, interval, around_eval
        self._seconds, self._collections = 0.0, 0
        self._pass_started: Optional[float] = None

    def __enter__(self) -> "GarbageCollection":
        if self.manual:
            gc.disable()
            gc.collect()  # setup's garbage, before the first step (not counted)
        gc.callbacks.append(self._observe)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._observe)
        if self.manual:
            gc.enable()

    def after_step(self, iteration: int) -> None:
        if self.manual and self.interval and iteration % self.interval == 0:
            gc.collect()

    def before_eval(self) -> None:
        if self.manual and self.around_eval:
            gc.collect()

    def after_eval(self) -> None:
        """Only the youngest generation: what the evaluation itself left, as Megatron-LM does."""
        if self.manual and self.around_eval:
            gc.collect(generation=0)

    def take(self) -> Tuple[float, int]:
        """Seconds spent collecting and collections made since the last call (this process, any
        thread)."""
        taken = self._seconds, self._collections
        self._seconds, self._collections = 0.0, 0
        return taken

    def _observe(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._pass_started = time.perf_counter()
        elif self._pass_started is not None:
            self._seconds += time.perf_counter() - self._pass_started
            self._collections += 1
            self._pass_started = None
