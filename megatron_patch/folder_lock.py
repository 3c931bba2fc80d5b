"""One writer at a time per output folder: a training run's --save, a conversion's --output-dir.

Two jobs on one folder interleave their files, and the second's start-up cleans up what it takes
for the first's leftovers: a trainer removed the other run's save in progress (which that run
then published without its weights); a conversion took the other's staging folder for an
interrupted one to resume. The writer holds an advisory lock (``flock``) on a file in the folder
for its lifetime; the kernel releases it when the process ends, however it ends, so no stale
lock survives a crash. A writer that finds the folder held may wait a while, then refuses,
naming the holder. File systems without ``flock`` support are warned about and let through;
shared ones (Lustre mounted with ``flock``, NFSv4, GPFS) lock across nodes.
Only the standard library here: it is cheap to import.
"""
import errno
import fcntl
import logging
import os
import socket
import time
from typing import IO

logger = logging.getLogger(__name__)


class FolderInUse(RuntimeError):
    """Another process holds the folder; the message names it and what to do."""


def hold_folder(folder: str, lock_name: str, refusal: str, wait_seconds: float = 0.0) -> IO:
    """Takes `folder`'s lock, waiting up to `wait_seconds` for another holder to end; returns the
    open lock file, to keep for the writer's lifetime (closing it releases the lock). Raises
    FolderInUse with `refusal` formatted with {holder} (pid, host, since when)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, lock_name)
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
                raise FolderInUse(refusal.format(holder=holder)) from None
            if not warned:
                logger.warning("%s is in use by %s; waiting up to %.0f s for it to end", folder,
                               holder, wait_seconds)
                warned = True
            time.sleep(min(1.0, wait_seconds))
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            logger.warning("cannot lock %s (%s): a second writer started on this folder would "
                           "not be noticed", path, error)
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
