"""The console's word on samples a run could not use (megatron_patch/training/data_report.py)."""
from megatron_patch.training.checkpointing import RunState
from megatron_patch.training.data_report import done_line, overlong_warning


def test_the_first_drop_warns_with_the_share_and_the_fix():
    text = overlong_warning(RunState(dropped_overlong=10, samples_read=36), 128)
    assert "longer than --seq-length 128 are being dropped" in text
    assert "10 of 36 samples read (27.8%) so far" in text
    assert "raise --seq-length" in text and "--overlong truncate" in text


def test_the_last_line_counts_what_was_dropped_or_skipped():
    assert done_line(RunState(iteration=9, skipped_steps=1)) == \
        "done: 9 iterations, 1 skipped steps"
    line = done_line(RunState(iteration=9, dropped_overlong=10, bad_samples=2, samples_read=40))
    assert line == ("done: 9 iterations, 0 skipped steps; 10 of 40 samples read (25.0%) dropped "
                    "as longer than --seq-length; 2 of 40 samples read (5.0%) skipped as "
                    "undecodable")
