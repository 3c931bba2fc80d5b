"""Graceful stop on SIGTERM/SIGINT (and a configurable pre-timeout signal such as SLURM's SIGUSR1).

The first signal only sets a flag: the loop finishes the current step, saves a checkpoint and
exits with EXIT_SIGNALLED. A second signal exits at once (the user really means it), with the
last complete checkpoint still on disk because saves are published atomically.
"""
import os
import signal
import sys
import threading
from typing import Iterable

EXIT_SIGNALLED = 15  # distinct from errors (1) so job scripts can requeue
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        self.received = None
        self._lock = threading.Lock()
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        with self._lock:
            if self.received is not None:
                sys.stderr.write(f"second signal {signal.Signals(signum).name}: exiting now\n")
                sys.stderr.flush()
                os._exit(EXIT_SIGNALLED)
            self.received = signal.Signals(signum).name
        sys.stderr.write(f"received {self.received}: finishing this step, saving, then exiting "
                         "(send it again to exit at once)\n")
        sys.stderr.flush()

    @property
    def requested(self) -> bool:
        return self.received is not None


def signal_from_name(name: str) -> int:
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}")
