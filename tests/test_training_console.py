"""The trainer's console may close under it (megatron_patch/training/console.py): the process
goes on without raising and without noise at exit; other write errors still raise."""
import errno
import subprocess
import sys

import pytest

from megatron_patch.training.console import SurvivingStream
from trainer_runs import REPO, subprocess_env

# prints a line, waits until its reader is gone, then prints and logs more (as a save would) and
# records that it got past them
AFTER_THE_READER_ENDS = """
import logging, os, sys, time
if sys.argv[1] == "surviving":
    from megatron_patch.training.console import keep_running_without_a_console
    keep_running_without_a_console()
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
print("ready", flush=True)
sys.stdin.readline()  # the test closes our stdout's reader, then this pipe
for index in range(1000):
    print("saving", index, flush=True)
logging.info("saved")
sys.stderr.write("stderr too\\n")
open(sys.argv[2], "w").write("went on")
"""


@pytest.mark.parametrize("mode", ["surviving", "plain"])
def test_a_closed_console_does_not_end_the_process(mode, tmp_path):
    marker = tmp_path / "marker"
    process = subprocess.Popen([sys.executable, "-c", AFTER_THE_READER_ENDS, mode, str(marker)],
                               cwd=REPO, env=subprocess_env(), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"ready\n"
    process.stdout.close()
    process.stdin.close()
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=60)
    if mode == "plain":  # what the wrapper prevents
        assert code != 0 and "BrokenPipeError" in stderr and not marker.exists()
    else:
        assert code == 0 and marker.read_text() == "went on"
        assert "BrokenPipeError" not in stderr and "Exception ignored" not in stderr


class _Full:
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_other_write_errors_still_raise():
    stream = SurvivingStream(_Full())
    with pytest.raises(OSError, match="No space left"):
        stream.write("x")
    assert not stream.lost
