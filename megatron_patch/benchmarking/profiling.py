"""Where one training step's time goes: an extra, untimed step under ``torch.profiler``.

A throughput figure says how fast, not why. On a GPU this answers the first question of any
slow step: is the device busy (then which kernels: matmuls, attention, elementwise, optimizer)
or idle, waiting on the host (launch overhead, synchronising calls, data)? It records the
device's kernels, merges their intervals into busy time, and sorts kernel time into a few
categories by kernel name. It also counts the host's waits for the device in that step (torch's
sync debug mode), by the line that caused each: a wait inside every micro-batch drains the
GPU's queue and leaves it idle while the host launches what follows. On the CPU, where there
are no kernels, the same report lists the operators' own CPU time instead, so the code path
runs in the CPU tests.
"""
from __future__ import annotations

import collections
import contextlib
import os
import time
import traceback
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from megatron_patch.benchmarking.memory_peak import allocation_site

# kernel-name fragments (lower case) -> category; the first match wins
CATEGORIES = (
    ("attention", ("flash", "fmha", "attn", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "matmul")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl",)),
    ("copy", ("memcpy", "memset", "copy_kernel", "catarray")),
)
TOP_KERNELS = 40


def categorise(name: str) -> str:
    lowered = name.lower()
    for category, fragments in CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


def merged_length(intervals: List[Tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping ``(start, end)`` intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def sync_site(stack: Sequence[traceback.FrameSummary]) -> str:
    """The line a host sync came from: the innermost frame of ``stack`` (outermost first, as
    ``traceback.extract_stack`` gives it) outside torch, the warnings machinery and this
    module."""
    frames = [{"filename": frame.filename, "line": frame.lineno, "name": frame.name}
              for frame in reversed(stack)
              if frame.filename != __file__ and os.path.basename(frame.filename) != "warnings.py"]
    return allocation_site(frames)


@contextlib.contextmanager
def counting_syncs(device: torch.device):
    """Yields a Counter of the host's waits for the device by :func:`sync_site`, filled while
    the block runs (torch's sync debug mode, which warns at each one); None on the CPU."""
    if device.type != "cuda":
        yield None
        return
    sites: collections.Counter = collections.Counter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                sites[sync_site(traceback.extract_stack()[:-1])] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(previous)


def profile_step(run_step: Callable[[], object], device: torch.device, label: str,
                 directory: str) -> Dict:
    """Runs ``run_step`` once under the profiler; writes ``<directory>/<label>_profile.txt``
    (the top kernels by device time and the top calls by the host's own time; on the CPU the
    operators) and returns the summary figures."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        with counting_syncs(device) as syncs:
            run_step()
        if on_gpu:
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - started) * 1e6
    summary = _kernel_summary(profiler, wall_us) if on_gpu else {"wall_s": wall_us / 1e6}
    if syncs is not None:
        summary["host_syncs"] = sum(syncs.values())
        summary["host_syncs_by_site"] = dict(syncs.most_common())
    averages = profiler.key_averages()
    # by device time: which kernels; by the host's own time: which calls keep it from
    # launching them sooner (a host-bound step's question)
    sort_keys = ("self_cpu_time_total",)
    if on_gpu:
        sort_keys = ("self_device_time_total",) + sort_keys
    table = "\n\n".join(f"sorted by {key}:\n" + averages.table(
        sort_by=key, row_limit=TOP_KERNELS, max_name_column_width=90) for key in sort_keys)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{label}_profile.txt")
    with open(path, "w") as handle:
        handle.write(_format_summary(label, summary) + "\n\n" + table)
    summary["table"] = path
    return summary


def _kernel_summary(profiler, wall_us: float) -> Dict:
    intervals, by_category = [], {}
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        intervals.append((start, end))
        category = categorise(event.name)
        by_category[category] = by_category.get(category, 0.0) + (end - start)
    busy_us = merged_length(intervals)
    return {"wall_s": wall_us / 1e6, "device_busy_s": busy_us / 1e6,
            "device_busy_fraction": busy_us / wall_us if wall_us else None,
            "kernels": len(intervals),
            "kernel_seconds_by_category": {name: us / 1e6 for name, us in
                                           sorted(by_category.items(), key=lambda kv: -kv[1])}}


def _format_summary(label: str, summary: Dict) -> str:
    lines = [f"{label}: profiled step {summary['wall_s']:.3f} s"]
    if "device_busy_s" in summary:
        busy = 100 * summary["device_busy_fraction"]
        lines.append(f"device busy {summary['device_busy_s']:.3f} s ({busy:.1f}%), "
                     f"{summary['kernels']} kernels")
        lines += [f"  {name}: {seconds:.3f} s"
                  for name, seconds in summary["kernel_seconds_by_category"].items()]
    if "host_syncs" in summary:
        lines.append(f"host syncs in the step: {summary['host_syncs']}")
        lines += [f"  {count} x {site}" for site, count in summary["host_syncs_by_site"].items()]
    return "\n".join(lines)


__all__ = ["categorise", "counting_syncs", "merged_length", "profile_step", "sync_site"]
