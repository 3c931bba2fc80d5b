"""One run at a time per --save folder.

Two jobs on one folder (a restart started while the first job still runs, two submissions of
one script) interleave their checkpoints and metrics, and the second's start-up removes the
first's save in progress, which the first then publishes without its weights. Rank 0 holds an
advisory lock (``flock``) on ``SAVE/.run.lock`` for the run's lifetime; the kernel releases it
when the process ends, however it ends, so no stale lock survives a crash. A run that finds the
folder held waits a while (the previous job of a restart may still be finishing its last save)
and then refuses, naming the holder. File systems without ``flock`` support are warned about and
let through; shared ones (Lustre mounted with ``flock``, NFSv4, GPFS) lock across nodes.
Only the standard library here: it is cheap to import.
"""
import errno
import fcntl
import logging
import os
import socket
import time
from typing import IO, Optional

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
WAIT_SECONDS = 120.0


class SaveFolderLocked(RuntimeError):
    """Another run holds the --save folder (the trainer adds no resume hint to it)."""


def hold_save_folder(save: str, wait_seconds: float = WAIT_SECONDS) -> Optional[IO]:
    """Takes the folder's lock, waiting up to `wait_seconds` for another holder to end; returns
    the open lock file, to keep for the run's lifetime (closing it releases the lock)."""
    os.makedirs(save, exist_ok=True)
    path = os.path.join(save, LOCK_NAME)
    handle = open(path, "a+")
    deadline, warned = time.monotonic() + wait_seconds, False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(path)
            if time.monotonic() >= deadline:
                handle.close()
                raise SaveFolderLocked(
                    f"another run ({holder}) is using --save {save}: two runs in one folder "
                    "would overwrite each other's checkpoints. Stop it (or wait for it to end) "
                    "and rerun, or choose another --save") from None
            if not warned:
                logger.warning("--save %s is in use by %s; waiting up to %.0f s for it to end",
                               save, holder, wait_seconds)
                warned = True
            time.sleep(min(1.0, wait_seconds))
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            logger.warning("cannot lock %s (%s): a second run started on this folder would not "
                           "be noticed", path, error)
            return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _holder(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip() or "a process"
    except OSError:
        return "a process"
