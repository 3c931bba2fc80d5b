"""data/ordered_pool.py: the converter's worker processes. Results come in input order, the
input is read only a bounded way ahead, workers start clean rather than as copies of the caller
and end with it, and a worker that dies is an error instead of a wait without end."""
import os
import signal
import sys
import time
import types

import pytest

from megatron_patch.data.ordered_pool import OrderedProcessMap, WorkerDied


def square_after_a_while(item):
    time.sleep(0.002 * (item % 3))  # later items often finish first
    return item * item


MARKER = "_ordered_pool_caller_only"


def has_the_callers_marker(_):
    return MARKER in sys.modules


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


def test_workers_start_clean_not_as_copies_of_the_caller(monkeypatch):
    """A forked worker would be a copy of the caller, held locks of its other threads included;
    these start from a fresh server: what the caller has in memory is not there."""
    monkeypatch.setitem(sys.modules, MARKER, types.ModuleType(MARKER))
    with OrderedProcessMap(has_the_callers_marker, 2) as pool:
        assert not any(pool.map(range(8)))


def test_a_killed_worker_is_an_error_not_a_hang():
    started = time.monotonic()
    got = []
    with pytest.raises(WorkerDied, match="worker process died"):
        with OrderedProcessMap(killed_at_seven, 2, chunk_size=4) as pool:
            for result in pool.map(range(40)):
                got.append(result)
    # at most the chunk before the dead one (the pool may fail it too if the death comes
    # before its result is back); never anything from the dead chunk or after it
    assert got in ([], [0, 1, 2, 3])
    assert time.monotonic() - started < 60


def worker_pid(_):
    return os.getpid()


KILLED_CALLER = """
import os, sys
sys.path.insert(0, sys.argv[1])
from megatron_patch.data.ordered_pool import OrderedProcessMap
from test_data_ordered_pool import worker_pid
if __name__ == "__main__":
    with OrderedProcessMap(worker_pid, 2, chunk_size=1) as pool:
        print(*sorted(set(pool.map(range(40)))), flush=True)
        os.kill(os.getpid(), 9)
"""


def test_workers_end_when_the_caller_is_killed(tmp_path):
    """SIGKILL runs no cleanup: the workers notice the caller is gone and end themselves."""
    import subprocess
    script = tmp_path / "caller.py"
    script.write_text(KILLED_CALLER)
    result = subprocess.run([sys.executable, str(script), os.path.dirname(__file__)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    workers = [int(pid) for pid in result.stdout.split()]
    assert workers and os.getpid() not in workers
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
