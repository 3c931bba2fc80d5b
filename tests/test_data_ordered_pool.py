"""data/ordered_pool.py: the converter's worker processes. Results come in input order, the
input is read only a bounded way ahead, workers do not inherit the caller's threads, and a
worker that dies is an error instead of a wait without end."""
import os
import signal
import threading
import time

import pytest

from megatron_patch.data.ordered_pool import OrderedProcessMap, WorkerDied


def square_after_a_while(item):
    time.sleep(0.002 * (item % 3))  # later items often finish first
    return item * item


def native_threads(_):
    return len(os.listdir("/proc/self/task"))


def killed_at_seven(item):
    if item == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


def test_results_come_in_input_order():
    with OrderedProcessMap(square_after_a_while, 3, chunk_size=4) as pool:
        assert list(pool.map(range(101))) == [i * i for i in range(101)]


def test_the_input_is_read_a_bounded_way_ahead():
    taken = []

    def items():
        for i in range(10_000):
            taken.append(i)
            yield i

    with OrderedProcessMap(square_after_a_while, 2, chunk_size=5, window=3) as pool:
        results = pool.map(items())
        assert next(results) == 0
        # 2 workers x 3 chunks x 5 items in flight, plus the one chunk read after the first
        assert len(taken) <= 2 * 3 * 5 + 5
        results.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_workers_start_without_the_callers_threads():
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(5)]
    for thread in threads:
        thread.start()
    try:
        assert native_threads(None) >= 6
        with OrderedProcessMap(native_threads, 2) as pool:
            assert set(pool.map(range(8))) == {1}
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_a_killed_worker_is_an_error_not_a_hang():
    started = time.monotonic()
    got = []
    with pytest.raises(WorkerDied, match="worker process died"):
        with OrderedProcessMap(killed_at_seven, 2, chunk_size=4) as pool:
            for result in pool.map(range(40)):
                got.append(result)
    assert got == [0, 1, 2, 3]  # the chunk before the dead one; nothing after it
    assert time.monotonic() - started < 60
