"""--record-memory-history's dump logic (training/memory_history.py) with torch's CUDA memory
functions stood in: one dump, at the first of 'after the first iteration' and 'out of memory',
then recording stops. The real recording runs in tests/test_training_gpu.py."""
import pickle

import torch

from megatron_patch.benchmarking import memory_peak
from megatron_patch.training.memory_history import MemoryHistory, snapshot_path

MIB = 2 ** 20


def test_each_rank_writes_its_own_file():
    assert snapshot_path("/run/memory_snapshot.pickle", 3) == "/run/memory_snapshot_rank3.pickle"
    assert snapshot_path("/run/snap", 0) == "/run/snap_rank0.pickle"


def test_the_first_trigger_dumps_once_and_stops_recording(tmp_path, monkeypatch):
    calls, observers = [], []
    trace = [{"action": "alloc", "addr": 1, "size": 64 * MIB,
              "frames": [{"filename": "/src/megatron/core/optimizer.py", "line": 7,
                          "name": "step"}]}]
    cuda_memory = torch.cuda.memory
    monkeypatch.setattr(cuda_memory, "_record_memory_history",
                        lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cuda_memory, "_snapshot", lambda: {"device_traces": [[], trace]})
    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", observers.append,
                        raising=False)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 2 * MIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 66 * MIB)

    history = MemoryHistory(str(tmp_path / "memory_snapshot.pickle"), rank=0)
    assert calls[0]["stacks"] == "python" and len(observers) == 1
    history.after_step()
    history.after_step()  # later iterations: nothing more
    observers[0](0, 0, 0, 0)  # an out-of-memory error after the dump: nothing more either
    assert calls[1:] == [{"enabled": None}]  # recording stopped once
    assert pickle.loads((tmp_path / "memory_snapshot_rank0.pickle").read_bytes()) == \
        {"device_traces": [[], trace]}  # another visible GPU's trace is empty
    lines = (tmp_path / "memory_snapshot_rank0.txt").read_text().splitlines()
    assert lines[0] == ("rank 0, recorded after the first iteration: 0.06 GiB alive at the peak "
                        "(torch.cuda.max_memory_allocated: 0.06 GiB)")
    assert lines[1].endswith("allocated before recording began")
    assert lines[2].endswith("1 x  optimizer.py:7 step")
    assert memory_peak.MAX_ENTRIES >= 1_000_000


def test_an_out_of_memory_error_dumps_what_filled_the_device(tmp_path, monkeypatch):
    observers = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kwargs: None)
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"device_traces": [[]]})
    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", observers.append,
                        raising=False)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    MemoryHistory(str(tmp_path / "snap.pickle"), rank=2)
    observers[0](0, 0, 0, 0)
    text = (tmp_path / "snap_rank2.txt").read_text()
    assert text.startswith("rank 2, recorded at an out-of-memory error: ")
