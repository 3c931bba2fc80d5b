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
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
