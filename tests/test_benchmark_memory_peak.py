"""benchmarking/memory_peak.py: replaying a CUDA allocator trace to its peak, on hand-made
traces (the recording itself needs a GPU; the gpu check runs it through the benchmark)."""
import os

import pytest
import torch

from megatron_patch.benchmarking.memory_peak import (allocation_site, format_breakdown,
                                                     live_at_peak, record_step)

MIB = 2 ** 20
TORCH = os.path.join("", "usr", "lib", "torch", "nn", "functional.py")


def _frames(*where):
    return [{"filename": filename, "line": line, "name": name} for filename, line, name in where]


LOSS = _frames((TORCH, 10, "linear"), ("/src/megatron/core/cross_entropy.py", 232, "forward"),
               ("/src/train.py", 5, "main"))
LAYER = _frames(("/src/megatron/core/mlp.py", 224, "forward"), ("/src/train.py", 5, "main"))


def test_allocation_site_is_the_innermost_frame_outside_torch():
    assert allocation_site(LOSS) == "cross_entropy.py:232 forward"
    assert allocation_site(_frames((TORCH, 1, "f"))) == "inside torch"


def test_the_breakdown_is_taken_at_the_peak_not_at_the_end():
    """Two layer activations, then the loss's tensor on top (the peak), then all freed and a
    later, smaller allocation: the peak holds the first three. A block from before the step
    freed on the way lowers the 'before' line; free_completed changes nothing."""
    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * MIB, "frames": LAYER},
        {"action": "alloc", "addr": 2, "size": 100 * MIB, "frames": LAYER},
        {"action": "free_requested", "addr": 99, "size": 30 * MIB},  # from before the step
        {"action": "free_completed", "addr": 99, "size": 30 * MIB},
        {"action": "alloc", "addr": 3, "size": 500 * MIB, "frames": LOSS},  # the peak
        {"action": "free_requested", "addr": 3, "size": 500 * MIB},
        {"action": "free_completed", "addr": 3, "size": 500 * MIB},
        {"action": "free_requested", "addr": 1, "size": 100 * MIB},
        {"action": "alloc", "addr": 3, "size": 50 * MIB, "frames": LOSS},
    ]
    breakdown = live_at_peak(trace, allocated_before=1000 * MIB)
    assert breakdown["before_step_bytes"] == 970 * MIB
    assert breakdown["peak_bytes"] == (970 + 200 + 500) * MIB
    assert breakdown["sites"] == [
        {"site": "cross_entropy.py:232 forward", "bytes": 500 * MIB, "allocations": 1},
        {"site": "mlp.py:224 forward", "bytes": 200 * MIB, "allocations": 2}]
    text = format_breakdown("megatron", breakdown, max_allocated=1670 * MIB)
    assert text.splitlines()[0] == ("megatron: 1.63 GiB alive at the peak "
                                    "(torch.cuda.max_memory_allocated: 1.63 GiB)")
    assert "0.49 GiB       1 x  cross_entropy.py:232 forward" in text


def test_a_step_that_only_frees_peaks_before_its_first_event():
    breakdown = live_at_peak([{"action": "free_requested", "addr": 7, "size": MIB}], 10 * MIB)
    assert breakdown == {"peak_bytes": 10 * MIB, "before_step_bytes": 10 * MIB, "sites": []}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (`pytest -m gpu`)")
def test_a_recorded_cuda_step_names_the_line_of_its_largest_allocation(tmp_path):
    device, kept = torch.device("cuda"), []

    def step():
        kept.append(torch.empty(256 * MIB, dtype=torch.uint8, device=device))
        temporary = torch.empty(64 * MIB, dtype=torch.uint8, device=device)
        del temporary

    result = record_step(step, device, "toy", str(tmp_path))
    top = result["top_sites"][0]
    assert top["bytes"] == 256 * MIB and top["site"].startswith("test_benchmark_memory_peak.py")
    assert result["peak_gib"] == pytest.approx(result["max_allocated_gib"], abs=0.01)
    assert (tmp_path / "toy_memory.pickle").stat().st_size > 0
