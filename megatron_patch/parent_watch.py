"""Ends a helper process when the process that started it is gone.

A trainer rank killed with SIGKILL (the OOM killer, a node's watchdog) runs no exit handlers, so
a helper it started would live on as an idle orphan with torch in memory: megatron's
checkpoint-result queue server did (compat/checkpoint_writer). Polling the parent's pid also
works where Linux's PR_SET_PDEATHSIG would not: that signal follows the *thread* that started
the child, and the queue is started from a short-lived thread.

Only the standard library here: a freshly spawned helper imports this module first.
"""
import os
import threading
import time

POLL_SECONDS = 1.0


def end_with_parent(parent_pid: int) -> None:
    """Called in the helper (e.g. as a multiprocessing initializer) with its parent's pid."""
    _exit_when(lambda: os.getppid() != parent_pid)


def end_with_process(pid: int) -> None:
    """The same for a helper whose parent is not the process it serves: a forkserver's worker
    (data/ordered_pool.py), whose parent is the server. Polls whether ``pid`` still runs: a
    killed process stays a zombie until its own parent reaps it, which may wait for the
    helper's end (``subprocess.run`` reading a pipe the helper inherited)."""
    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # PermissionError: the pid was reused
            return True
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:  # no /proc (not Linux): existence is all there is
            return False

    _exit_when(gone)


def _exit_when(gone) -> None:
    def watch() -> None:
        while not gone():
            time.sleep(POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
