"""--record-memory-history (Megatron-LM's flag): what holds the GPU's memory, in a real run.

An out-of-memory error names the allocation that failed, not what filled the device. With the
flag, each rank records its CUDA allocations (with Python stacks) from before the model is
built, and writes them out once: after the run's first iteration (whose peak every later step
repeats), or at an out-of-memory error, whichever comes first. Then recording stops, so the
rest of the run pays nothing for it. Each dump is two files: the allocator snapshot
(``--memory-snapshot-path``, per rank; for https://pytorch.org/memory_viz) and, next to it, a
``.txt`` of what was alive at the recorded peak, by source line (benchmarking/memory_peak.py);
its first lines also go to the log.
"""
from __future__ import annotations

import logging
import os

import torch

from megatron_patch.benchmarking.memory_peak import start_recording, write_snapshot

logger = logging.getLogger(__name__)


def snapshot_path(template: str, rank: int) -> str:
    """``memory_snapshot.pickle`` -> ``memory_snapshot_rank3.pickle``: one file per rank."""
    root, extension = os.path.splitext(template)
    return f"{root}_rank{rank}{extension or '.pickle'}"


class MemoryHistory:
    def __init__(self, path_template: str, rank: int):
        self.path, self.rank, self.recording = snapshot_path(path_template, rank), rank, True
        self.allocated_before = torch.cuda.memory_allocated()
        start_recording()
        torch._C._cuda_attach_out_of_memory_observer(self._on_out_of_memory)

    def _on_out_of_memory(self, device, allocated, device_allocated, device_free) -> None:
        self.dump("at an out-of-memory error")

    def after_step(self) -> None:
        """Called after every iteration: the first one writes the dump."""
        self.dump("after the first iteration")

    def dump(self, when: str) -> None:
        if not self.recording:
            return
        self.recording = False
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        summary = os.path.splitext(self.path)[0] + ".txt"
        _, text = write_snapshot(snapshot, self.path, summary,
                                 f"rank {self.rank}, recorded {when}", self.allocated_before,
                                 before="allocated before recording began")
        logger.warning("memory history %s: %s and %s\n%s", when, self.path, summary,
                       "\n".join(text.splitlines()[:8]))


__all__ = ["MemoryHistory", "snapshot_path"]
