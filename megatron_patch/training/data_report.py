"""What the console says about the samples a run could not use.

Over-long samples under ``--overlong drop`` are counted in TensorBoard and metrics.jsonl
(``data/dropped_overlong``), which nobody reads while a short trial run scrolls by. So the first
drop of a process is also a warning with the fix, and the run's last line gives the totals.
"""
from __future__ import annotations

from megatron_patch.training.checkpointing import RunState


def _share(count: int, read: int) -> str:
    return f"{count} of {read} samples read ({100 * count / max(read, 1):.1f}%)"


def overlong_warning(state: RunState, seq_length: int) -> str:
    return (f"samples longer than --seq-length {seq_length} are being dropped (--overlong drop): "
            f"{_share(state.dropped_overlong, state.samples_read)} so far, counted in "
            "data/dropped_overlong. To keep them raise --seq-length (or lower --max-pixels), or "
            "use --overlong truncate; tools/inspect_webdataset.py --tokenizer T --seq-length N "
            "counts them before training")


def done_line(state: RunState) -> str:
    """The run's last line: iterations, skipped steps, and the samples it could not use."""
    parts = [f"done: {state.iteration} iterations, {state.skipped_steps} skipped steps"]
    if state.dropped_overlong:
        parts.append(f"{_share(state.dropped_overlong, state.samples_read)} dropped as longer "
                     "than --seq-length")
    if state.bad_samples:
        parts.append(f"{_share(state.bad_samples, state.samples_read)} skipped as undecodable")
    return "; ".join(parts)
