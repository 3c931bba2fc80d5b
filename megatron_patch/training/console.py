"""A console that can go away without taking the run with it.

A trainer's output usually goes through a pipe (``| tee run.log``, a scheduler's log relay) or
to a terminal. When whatever reads it ends first -- the whole job signalled at once (Ctrl-C,
SLURM's ``--signal``, ``kill -- -PGID``) kills ``tee`` too, an ssh session drops -- the next
``print`` raises ``BrokenPipeError`` (or ``EIO`` on a hung-up terminal). Raised inside a
checkpoint save (megatron prints while saving), that failed the save the signal had asked for,
with a message about disk space; anywhere else it ended the run.

:func:`keep_running_without_a_console` makes ``sys.stdout`` and ``sys.stderr`` drop their output
from the first such error on, so the step, the save and ``$SAVE/run_*.log`` go on. The file
descriptor is then pointed at ``/dev/null``, so later writes from anything else holding it
(the interpreter's flush at exit, C code, child processes) go nowhere instead of failing.
Other errors (a full disk behind a redirect) are raised as before.
"""
from __future__ import annotations

import errno
import io
import os
import sys

CONSOLE_GONE = (errno.EPIPE, errno.EIO)


class SurvivingStream:
    """``stream`` until it reports that its reader is gone; then nothing."""

    def __init__(self, stream):
        self._stream = stream
        self.lost = False

    def write(self, text):
        if not self.lost:
            try:
                return self._stream.write(text)
            except OSError as error:
                self._lose(error)
        return len(text)

    def flush(self):
        if not self.lost:
            try:
                self._stream.flush()
            except OSError as error:
                self._lose(error)

    def _lose(self, error: OSError) -> None:
        if error.errno not in CONSOLE_GONE:
            raise error
        self.lost = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # no descriptor of its own (a captured stream): dropping the text is enough

    def __getattr__(self, name):  # encoding, fileno, isatty, ...
        return getattr(self._stream, name)


def keep_running_without_a_console() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` (once); call before logging is set up, whose
    console handler keeps the stream it is given."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SurvivingStream):
            setattr(sys, name, SurvivingStream(stream))
