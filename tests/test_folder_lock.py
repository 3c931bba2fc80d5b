"""One writer at a time per output folder: a second waits for the first to end, then refuses
naming it; a writer that ends however it ends (SIGKILL too) leaves no lock behind. The trainer
(--save) and the converter (--output-dir: tests/test_data_convert.py) hold it."""
import subprocess
import sys

import pytest

from megatron_patch.folder_lock import FolderInUse, hold_folder

HOLDER = """
import sys, time
from megatron_patch.folder_lock import hold_folder
lock = hold_folder(sys.argv[1], ".lock", "held by {holder}")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holding(folder, seconds):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_waits_for_the_first_then_refuses(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = _holding(folder, 3)
    try:
        with pytest.raises(FolderInUse, match=f"^held by pid {holder.pid} on "):
            hold_folder(str(folder), ".lock", "held by {holder}", wait_seconds=0.5)
        assert "waiting up to 0 s for it to end" in caplog.text
        hold_folder(str(folder), ".lock", "{holder}", wait_seconds=20).close()  # it ended
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_writer_leaves_no_lock(tmp_path):
    folder = tmp_path / "run"
    holder = _holding(folder, 60)
    holder.kill()
    holder.wait()
    lock = hold_folder(str(folder), ".lock", "{holder}")
    assert (folder / ".lock").read_text().startswith("pid ")
    lock.close()

