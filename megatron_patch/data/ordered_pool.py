"""An ordered map over worker processes that start clean, read their input lazily, and report
a worker's death instead of waiting for it.

``multiprocessing.Pool.imap`` (what the converter used) has two failure modes that matter for
a long conversion:

* a worker that dies -- killed by the kernel for memory, or crashed inside an image library --
  takes its tasks with it, and ``imap`` then waits for them forever;
* its default start method, ``fork``, copies the caller's memory while other threads may hold
  locks in it. A process that has run distributed code has dozens of such threads (each gloo
  process group leaves its own; measured: 50 after one, 100 after three), and a worker forked
  from it could crash on its first import.

Here the workers come from a ``forkserver`` (a fresh, single-threaded interpreter that has
imported only ``preload``), the tasks go in chunks through ``concurrent.futures``, whose pool
fails every pending task with ``BrokenProcessPool`` when a worker dies, and at most ``window``
chunks per worker are read ahead of the consumer, so a huge input is never read into memory.
Workers end themselves within a second of the caller's death (parent_watch): a converter killed
with SIGKILL leaves no idle workers, and with them the server exits too.

As with any start method but ``fork``, the script that starts the pool is imported again in
each worker (as ``__mp_main__``): its top level must be guarded by
``if __name__ == "__main__":``, as every script in tools/ is.
"""
from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, List, Sequence

from megatron_patch.parent_watch import end_with_process


class WorkerDied(RuntimeError):
    """A worker process ended abruptly (a signal such as the kernel's out-of-memory kill, or a
    crash); the results already consumed are valid, the rest were not computed."""


def _apply(function: Callable, chunk: List) -> List:
    return [function(item) for item in chunk]


class OrderedProcessMap:
    """``with OrderedProcessMap(function, workers) as pool: for result in pool.map(items)``:
    ``function(item)`` for every item, in input order. ``function`` must be importable by name
    (a module-level function); ``preload`` names modules the server imports once for all
    workers."""

    def __init__(self, function: Callable, workers: int, *, preload: Sequence[str] = (),
                 chunk_size: int = 16, window: int = 4):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
        self.function, self.chunk_size, self.in_flight = function, chunk_size, workers * window
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                            initializer=end_with_process,
                                            initargs=(os.getpid(),))

    def __enter__(self) -> "OrderedProcessMap":
        return self

    def __exit__(self, *exc) -> None:
        # on an error nothing queued is worth finishing; on success nothing is left to cancel
        self.executor.shutdown(wait=True, cancel_futures=True)

    def map(self, items: Iterable) -> Iterator:
        chunks = iter(lambda it=iter(items): list(itertools.islice(it, self.chunk_size)), [])
        pending = collections.deque()

        def submit(count: int) -> None:  # the next `count` chunks of the input, if any are left
            pending.extend(self.executor.submit(_apply, self.function, chunk)
                           for chunk in itertools.islice(chunks, count))

        submit(self.in_flight)
        done = 0
        while pending:
            try:
                results = pending.popleft().result()
            except BrokenProcessPool as error:
                raise WorkerDied(
                    f"a worker process died (killed, e.g. by the out-of-memory killer, or "
                    f"crashed) after {done} results had come back") from error
            submit(1)
            done += len(results)
            yield from results


__all__ = ["OrderedProcessMap", "WorkerDied"]
