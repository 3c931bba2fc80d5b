"""One run at a time per --save folder: a second run waits for the first to end, then refuses,
naming it; a run that ends however it ends (SIGKILL too) leaves no lock behind."""
import subprocess
import sys

import pytest

from megatron_patch.training.save_lock import SaveFolderLocked, hold_save_folder

HOLDER = """
import sys, time
from megatron_patch.training.save_lock import hold_save_folder
lock = hold_save_folder(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holding(save, seconds):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(save), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_waits_for_the_first_then_refuses(tmp_path, caplog):
    save = tmp_path / "run"
    holder = _holding(save, 3)
    try:
        with pytest.raises(SaveFolderLocked, match=f"another run \\(pid {holder.pid} on .*\\) is "
                           f"using --save {save}: two runs in one folder would overwrite"):
            hold_save_folder(str(save), wait_seconds=0.5)
        assert "waiting up to 0 s for it to end" in caplog.text
        hold_save_folder(str(save), wait_seconds=20).close()  # the holder ends by itself
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_leaves_no_lock(tmp_path):
    save = tmp_path / "run"
    holder = _holding(save, 60)
    holder.kill()
    holder.wait()
    lock = hold_save_folder(str(save), wait_seconds=0)
    assert (save / ".run.lock").read_text().startswith("pid ")
    lock.close()
