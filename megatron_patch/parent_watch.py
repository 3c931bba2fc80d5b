"""Ties a helper process's life to the process it serves, and to nothing else.

A helper (a data-loader worker, the checkpoint writer's result server) ends when its rank is
gone, and not before: the stop signal that asks the rank to finish its step and save reaches the
helpers too (Ctrl-C and ``kill -- -PGID`` signal the process group, SLURM every process of the
job step, torchrun its workers' groups), and a helper that died of it would fail that very save
or step. `ignore_job_stop_signals` makes a server deaf to those signals (the rank ends it with
SIGKILL); `deaf_while_the_rank_runs` does so for forked workers until the rank exits, since
torch and multiprocessing end a worker that outlives its loader with SIGTERM.

A trainer rank killed with SIGKILL (the OOM killer, a node's watchdog) runs no exit handlers, so
a helper it started would live on as an idle orphan with torch in memory: megatron's
checkpoint-result queue server did (compat/checkpoint_writer). Polling the parent's pid also
works where Linux's PR_SET_PDEATHSIG would not: that signal follows the *thread* that started
the child, and the queue is started from a short-lived thread.

Only the standard library here: a freshly spawned helper imports this module first.
"""
import os
import signal
import threading
import time

POLL_SECONDS = 1.0
JOB_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def ignore_job_stop_signals() -> None:
    """In a helper server: the job's stop signals are for its rank."""
    for signum in JOB_STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


_rank_exiting = None  # shared with the workers forked after its creation


def rank_exit_flag():
    """The flag a forked worker reads (see `deaf_while_the_rank_runs`); made on first use, set
    when this process exits (atexit runs this module's handler before multiprocessing's, which
    terminates the workers still alive)."""
    global _rank_exiting
    if _rank_exiting is None:
        import atexit
        import multiprocessing
        _rank_exiting = multiprocessing.get_context("fork").RawValue("b", 0)
        atexit.register(_mark_rank_exiting)
    return _rank_exiting


def _mark_rank_exiting() -> None:
    _rank_exiting.value = 1


def deaf_while_the_rank_runs(exit_flag) -> None:
    """In a forked worker: the job's stop signals are ignored while the rank runs, and end the
    worker as usual once `exit_flag` (from `rank_exit_flag`) is set."""
    def on_stop_signal(signum, frame):
        if exit_flag.value:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for signum in JOB_STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)


def serve_until_parent_ends(parent_pid: int) -> None:
    """A multiprocessing initializer for a helper server: deaf to the job's stop signals, ended
    when its parent is gone."""
    ignore_job_stop_signals()
    end_with_parent(parent_pid)


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


def call_when_parent_ends(parent_pid: int, action) -> None:
    """Calls `action()` (in a thread of its own) once the parent is gone."""
    _when(lambda: os.getppid() != parent_pid, action)


def _exit_when(gone) -> None:
    _when(gone, lambda: os._exit(0))


def _when(gone, action) -> None:
    def watch() -> None:
        while not gone():
            time.sleep(POLL_SECONDS)
        action()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
