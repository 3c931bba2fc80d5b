"""Graceful stop on SIGTERM/SIGINT (and a configurable pre-timeout signal such as SLURM's SIGUSR1).

The first signal only sets a flag: the loop finishes the current step, saves a checkpoint and
exits with EXIT_SIGNALLED. A second signal exits at once (the user really means it), with the
last complete checkpoint still on disk because saves are published atomically.

One stop often arrives twice within milliseconds: a scheduler signals every process of the job
while torchrun relays the signal it received to its workers, and Ctrl-C reaches torchrun and the
workers alike. Repeats within `repeat_window` seconds of the first are therefore the same stop,
not the "second signal" that aborts the save.
"""
import os
import signal
import sys
import threading
import time
from typing import Iterable

EXIT_SIGNALLED = 15  # distinct from errors (1) so job scripts can requeue
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_SECONDS = 2.0


class StopRequest:
    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS,
                 repeat_window: float = REPEAT_WINDOW_SECONDS):
        self.received = None  # the signal's name
        self.reason = None    # what asked for the stop, as the trainer's "stopping" line says it
        self.repeat_window = repeat_window
        self._first_at = None
        self._lock = threading.Lock()
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        with self._lock:
            if self.reason is not None:
                if time.monotonic() - self._first_at < self.repeat_window:
                    return  # the same stop, delivered again by another route
                sys.stderr.write(f"second signal {name}: exiting now without saving\n")
                sys.stderr.flush()
                os._exit(EXIT_SIGNALLED)
            self.received = name
            self.reason, self._first_at = f"received {name}", time.monotonic()
        sys.stderr.write(f"received {name}: finishing this step, saving, then exiting "
                         "(send it again to exit at once)\n")
        sys.stderr.flush()

    def request(self, reason: str) -> None:
        """The same stop, asked for by something other than a signal (the launcher's end)."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason, self._first_at = reason, time.monotonic()
        sys.stderr.write(f"{reason}: finishing this step, saving, then exiting\n")
        sys.stderr.flush()

    @property
    def requested(self) -> bool:
        return self.reason is not None


def signal_from_name(name: str) -> signal.Signals:
    """'SIGUSR1' or 'USR1' -> signal.SIGUSR1; ValueError for anything else."""
    full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        return signal.Signals[full]
    except KeyError:
        raise ValueError(f"{name} is not a signal name (e.g. SIGTERM, SIGUSR1)") from None
