"""What is alive at a training step's memory peak, by the source line that allocated it.

A peak-memory figure says how much, not what: the first GPU run peaked at 88 GiB, over an 80 GB
H100, and the states and activations we could count explained less than that. This records one
extra, untimed step's CUDA allocations with torch's memory history, replays the trace to the
moment the most bytes were allocated, and groups what was alive then by the innermost source
line outside torch (a megatron module, the loss, the optimizer). Allocations made before the
step (weights, gradient buffers, optimizer state) are one line of their own. The raw snapshot
is kept too, for https://pytorch.org/memory_viz.

The replay is plain Python over the trace's ``alloc`` / ``free_requested`` events, so it is
tested on the CPU with a hand-made trace; the recording itself needs CUDA.
"""
from __future__ import annotations

import os
import pickle
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

BEFORE_THE_STEP = "allocated before the step (weights, gradient buffers, optimizer state)"
TOP_SITES = 25
MAX_ENTRIES = 2_000_000  # allocator events kept (a ring): a few steps of a large model


def outside_torch(filename: str) -> bool:
    """Whether a source file is not torch's own: where a tensor's owner is found."""
    return f"{os.sep}torch{os.sep}" not in filename


def allocation_site(frames: Sequence[dict]) -> str:
    """The innermost frame outside torch's own files (frames come innermost first)."""
    for frame in frames:
        filename = frame.get("filename", "")
        if outside_torch(filename):
            return f"{os.path.basename(filename)}:{frame.get('line')} {frame.get('name', '')}"
    return "inside torch"


class _Replay:
    """Allocated bytes along the trace: ``alloc`` adds a block, ``free_requested`` removes one
    (when torch's allocated-bytes statistic drops; ``free_completed`` only returns the block to
    the cache). A freed block the trace never saw allocated was there before recording."""

    def __init__(self, allocated_before: int):
        self.live: Dict[int, tuple] = {}
        self.before = self.total = allocated_before

    def apply(self, event: dict) -> None:
        action, address = event["action"], event.get("addr")
        if action == "alloc":
            self.live[address] = (event["size"], event.get("frames", ()))
            self.total += event["size"]
        elif action == "free_requested":
            if address in self.live:
                self.total -= self.live.pop(address)[0]
            else:
                self.before -= event["size"]
                self.total -= event["size"]


def _peak_index(trace: Sequence[dict], allocated_before: int) -> int:
    """The event after which the most bytes were allocated (-1: before any)."""
    replay, peak, peak_at = _Replay(allocated_before), allocated_before, -1
    for index, event in enumerate(trace):
        replay.apply(event)
        if replay.total > peak:
            peak, peak_at = replay.total, index
    return peak_at


def live_at_peak(trace: Sequence[dict], allocated_before: int) -> Dict:
    """Bytes alive at the trace's highest point, grouped by allocation site (the 'before' line
    shrinks by the blocks from before the step that were freed by then)."""
    replay = _Replay(allocated_before)
    for event in trace[:_peak_index(trace, allocated_before) + 1]:
        replay.apply(event)
    sites: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for size, frames in replay.live.values():
        site = sites[allocation_site(frames)]
        site[0] += size
        site[1] += 1
    rows = [dict(site=site, bytes=total, allocations=count)
            for site, (total, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])]
    return {"peak_bytes": replay.total, "before_step_bytes": replay.before, "sites": rows}


def format_breakdown(label: str, breakdown: Dict, max_allocated: Optional[int],
                     before: str = BEFORE_THE_STEP) -> str:
    gib = 2 ** 30
    lines = [f"{label}: {breakdown['peak_bytes'] / gib:.2f} GiB alive at the peak"
             + (f" (torch.cuda.max_memory_allocated: {max_allocated / gib:.2f} GiB)"
                if max_allocated is not None else ""),
             f"{breakdown['before_step_bytes'] / gib:9.2f} GiB  {before}"]
    for row in breakdown["sites"][:TOP_SITES]:
        lines.append(f"{row['bytes'] / gib:9.2f} GiB  {row['allocations']:6d} x  {row['site']}")
    rest = breakdown["sites"][TOP_SITES:]
    if rest:
        lines.append(f"{sum(r['bytes'] for r in rest) / gib:9.2f} GiB  {len(rest)} more sites")
    return "\n".join(lines)


def start_recording() -> None:
    """The CUDA allocator's history from now on, with Python stacks (cheaper than C++ ones)."""
    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")


def write_snapshot(snapshot: Dict, pickle_path: str, text_path: str, label: str,
                   allocated_before: int, before: str = BEFORE_THE_STEP) -> Tuple[Dict, str]:
    """Writes ``snapshot`` (for memory_viz) and ``text_path``: what was alive at its trace's
    peak, by source line. Returns (the breakdown, the text)."""
    os.makedirs(os.path.dirname(os.path.abspath(pickle_path)), exist_ok=True)
    with open(pickle_path, "wb") as handle:
        pickle.dump(snapshot, handle)
    # one trace per visible GPU; a process allocates on its own only
    trace = max(snapshot.get("device_traces", []), key=len, default=[])
    breakdown = live_at_peak(trace, allocated_before)
    text = format_breakdown(label, breakdown, torch.cuda.max_memory_allocated(), before)
    with open(text_path, "w") as handle:
        handle.write(text + "\n")
    return breakdown, text


def record_step(run_step: Callable[[], object], device: torch.device, label: str,
                directory: str) -> Dict:
    """Runs ``run_step`` once with CUDA memory history on; writes
    ``<directory>/<label>_memory.pickle`` and ``<label>_memory_peak.txt``; returns the
    breakdown's figures (the top sites). Without CUDA there is nothing to record."""
    if device.type != "cuda":
        return {"skipped": "the CUDA allocator's history needs a GPU"}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device)
    start_recording()
    try:
        run_step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    path = os.path.join(directory, f"{label}_memory_peak.txt")
    breakdown, _ = write_snapshot(snapshot, os.path.join(directory, f"{label}_memory.pickle"),
                                  path, label, allocated_before)
    return {"peak_gib": breakdown["peak_bytes"] / 2 ** 30,
            "max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
            "before_step_gib": breakdown["before_step_bytes"] / 2 ** 30,
            "top_sites": breakdown["sites"][:10], "table": path}


__all__ = ["allocation_site", "format_breakdown", "live_at_peak", "outside_torch",
           "record_step", "start_recording", "write_snapshot"]
