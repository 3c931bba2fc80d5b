"""The trainer's own collectives (stop flags, counters, eval loss) must use tensors the process
group's backend can reduce: NCCL, the backend with CUDA, rejects host tensors. The GPU run itself
is tests/test_training_gpu.py; multi-rank results are covered by the 2-process trainer tests."""
import torch
import torch.distributed as dist

from megatron_patch.training import parallel_setup


def test_nccl_collectives_use_the_current_cuda_device(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert parallel_setup.collective_device() == torch.device("cuda", 3)


def test_gloo_collectives_stay_on_the_host(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert parallel_setup.collective_device() == torch.device("cpu")


def test_reduction_goes_through_the_collective_device_and_returns_a_host_tensor(monkeypatch):
    seen = []

    def fake_all_reduce(tensor, op=dist.ReduceOp.SUM):
        seen.append((tensor.device, op))
        tensor.mul_(2)  # as two ranks with the same values would sum them

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    values = torch.tensor([1.5, 2.0], dtype=torch.float64)
    reduced = parallel_setup.all_reduce_host(values, op=dist.ReduceOp.MAX)
    assert seen == [(torch.device("cpu"), dist.ReduceOp.MAX)]
    assert reduced.tolist() == [3.0, 4.0] and values.tolist() == [1.5, 2.0]  # input untouched
    assert reduced.device.type == "cpu"


def test_without_a_process_group_the_values_are_this_process_alone(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    values = torch.tensor([7], dtype=torch.int32)
    reduced = parallel_setup.all_reduce_host(values)
    assert reduced.tolist() == [7] and reduced is not values
