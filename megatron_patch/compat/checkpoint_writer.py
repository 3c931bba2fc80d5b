"""Warming up megatron's checkpoint-result queue before the first save.

megatron-core's torch_dist writer (FileSystemWriterAsync, used for synchronous saves too) hands
each save's write results back through a queue served by a process that it starts with the
"spawn" method on first use. That process imports torch when it unpickles the first results,
which made the first save of every run 2-3 s slower than the rest (measured on 2 CPU cores:
2.2 s against 0.2 s for the tiny model's iter_4 and iter_8).

:func:`start` does that first round trip in a background thread, so the import overlaps the
model, optimizer and data setup; :func:`wait` (called before a save) makes sure it is over
before megatron uses the queue. A failure here only costs the time it was meant to save:
megatron creates the queue itself as before.

The warm-up starts that server itself, as megatron would (a "spawn" multiprocessing manager,
stored in megatron's module global), plus a watch that ends the server when this process is gone:
a rank killed with SIGKILL used to leave it behind as an idle orphan holding torch. The server
ignores the job's stop signals: it died of the SIGTERM that reached the whole job, and the save
that signal asked for failed with a broken pipe. At a normal
exit the process kills the server (it holds nothing) instead of multiprocessing's orderly
shutdown, which waited up to 1 s for the server to tear down the torch it had imported (0.8 s of
every run's exit on 2 CPU cores). By then no result can arrive: the trainer waits for (or aborts)
its background saves before it returns.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
from multiprocessing.managers import SyncManager
from typing import Optional

from megatron_patch.parent_watch import serve_until_parent_ends

logger = logging.getLogger(__name__)

_warmup: Optional[threading.Thread] = None
_queue_started = threading.Event()


def start() -> None:
    """Starts the warm-up once per process (later calls do nothing).

    A process that ends meanwhile (a run failing at startup) first waits until the queue's
    server has started: multiprocessing's exit handler joins every child process, and one
    started but not yet registered for shutdown would be waited for forever. atexit runs the
    handlers last in, first out, so this one runs before multiprocessing's; it stops the server
    (and with it a round trip still under way)."""
    global _warmup
    if _warmup is None:
        _warmup = threading.Thread(target=_round_trip, name="checkpoint-writer-warmup",
                                   daemon=True)
        _warmup.start()
        atexit.register(_stop_server_at_exit)


def wait() -> None:
    """Blocks until the warm-up (if started) is over; megatron's queue is then safe to use."""
    if _warmup is not None:
        _warmup.join()


def _stop_server_at_exit() -> None:
    _queue_started.wait()
    server = _queue_server()
    if server is not None and server.is_alive():
        server.kill()
        server.join()


def _queue_server():
    """The process serving megatron's result queue, or None (not started, or the attributes of
    multiprocessing's manager and proxy are not where they were in Python 3.10-3.13)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    queue = getattr(filesystem_async, "_results_queue", None)
    return getattr(getattr(queue, "_manager", None), "_process", None)


def _round_trip() -> None:
    """Creates megatron's queue and passes one result of the kind a save returns through it,
    which makes the serving process import the classes (and torch) a save needs."""
    try:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.storage import WriteResult

        try:
            results = _start_results_queue()
        finally:
            _queue_started.set()
        results.put({0: [WriteResult(index=MetadataIndex("warmup"), size_in_bytes=0,
                                     storage_data=_StorageInfo("warmup", 0, 0))]})
        results.get()
    except Exception as error:  # an optimisation only: the save works without it
        logger.debug("checkpoint writer warm-up skipped: %s: %s", type(error).__name__, error)
    finally:
        _queue_started.set()


def _start_results_queue():
    """megatron's result queue (filesystem_async._get_write_results_queue creates the same when
    its global is empty), served by a process that ends with this one."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=serve_until_parent_ends, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
    return filesystem_async._results_queue
