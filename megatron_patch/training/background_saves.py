"""Checkpoints written while training goes on (``--async-save``).

A synchronous save stops every rank for as long as the file system takes to write the model
and optimizer shards: minutes per checkpoint for an 8B model with its Adam moments. With
``--async-save`` megatron's dist-checkpointing copies each rank's shards to host memory, a
forked process writes them, and the next step starts at once. The checkpoint is published
(``run_state.json``, ``COMPLETE``, the rename and the tracker: see checkpointing and
checkpoint_paths) by finalize functions that run on every rank together at the first step that
finds every rank's writer done. Until then it is an ``iter_N.partial-*`` folder, so a run that
dies while a write is in flight loses that checkpoint only, exactly like a synchronous save
killed midway, and the next start removes the folder.

One save is in flight at a time: a save that finds the previous one still writing waits for it
(two host copies of the state would double the memory a save needs), and says so, since a
--save-interval shorter than the write time gains nothing.
"""
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from torch.distributed.checkpoint import CheckpointException

from megatron_patch.training.fault_injection import fault_point

logger = logging.getLogger("megatron_patch.train")


@dataclass
class _InFlight:
    path: str
    started: float
    on_failure: Callable[[str], BaseException]


class BackgroundSaves:
    """Schedules megatron async save requests and publishes them when every rank has written.

    `poll`, `wait` and `schedule` are collective: every rank calls them at the same point of
    the loop (megatron all-reduces the writers' liveness)."""

    def __init__(self):
        self.queue = AsyncCallsQueue(persistent=False)  # a forked writer per save
        self.in_flight: Optional[_InFlight] = None

    @property
    def busy(self) -> bool:
        return self.in_flight is not None

    def schedule(self, request: AsyncRequest, iteration: int, path: str, rank: int,
                 on_failure: Callable[[str], BaseException]) -> None:
        """Starts the writer of `request` (its finalize functions publish the checkpoint).
        `on_failure(cause)` turns a failed background write into the error to raise."""
        assert not self.busy, "wait() for the save in flight first"
        if request.async_fn is not None:
            request = request._replace(async_fn=_with_fault_point(request.async_fn, iteration, rank))
        self.in_flight = _InFlight(path, time.time(), on_failure)
        self.queue.schedule_async_request(request)

    def poll(self) -> None:
        """Publishes the save in flight if every rank's writer has finished; never blocks."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Blocks until the save in flight is written and published."""
        if self.busy:
            waited = time.time()
            self._finalize(blocking=True)
            logger.info("waited %.1f s for the checkpoint being written", time.time() - waited)

    def abort(self) -> None:
        """Kills the writer (the run is failing; its partial folder is removed at the next
        start). Not collective."""
        for call in self.queue.async_calls:
            call.async_caller.close(abort=True)
        self.queue.async_calls.clear()
        self.in_flight = None

    def _finalize(self, blocking: bool) -> None:
        if not self.busy:
            return
        pending = self.in_flight
        try:
            finished = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as error:
            self.in_flight = None
            if isinstance(error, CheckpointException):  # a rank's writer failed: on all ranks
                raise pending.on_failure(_describe(error)) from error
            raise
        if finished:
            self.in_flight = None
            logger.info("saved %s (written in the background in %.1f s)", pending.path,
                        time.time() - pending.started)


def _describe(error: CheckpointException) -> str:
    """One line per failed writer (torch details them on the coordinating rank only)."""
    if not error.failures:
        return "another rank's background writer failed"
    failed = "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}"
                       for rank, (exc, _) in sorted(error.failures.items()))
    return (f"the background writer failed ({failed}; a writer that was killed or crashed "
            "leaves no result)")


def _with_fault_point(write: Callable, iteration: int, rank: int) -> Callable:
    """The writer with the ``save:background`` fault point in front (it runs in the forked
    process: a kill or an error there is a writer that dies or fails)."""
    def write_with_fault_point(*args, **kwargs):
        fault_point("save:background", iteration, rank)
        return write(*args, **kwargs)

    return write_with_fault_point
