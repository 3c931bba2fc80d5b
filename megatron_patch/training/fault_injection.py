"""Deterministic faults at named points of a run, for the reliability tests and for drills.

Real failures (preemption, a full disk, a node that dies mid-save) are rare and badly timed; to
prove that a run survives them, the tests trigger each one at an exact place. The trainer calls
`fault_point(name, iteration, rank)` at each place that matters; it does nothing unless the
environment variable ``LLAVA_FAULT`` names that place:

    LLAVA_FAULT="<point>@<iteration>[:<action>][:rank<N>][:group]"  (several separated by commas)

points:  ``step`` (after the optimizer step of that iteration) and, inside a checkpoint save of
         that iteration, ``save:start``, ``save:after_model`` (dist-checkpoint written),
         ``save:after_extras`` (RNG and loader states written), ``save:before_publish`` (all in
         the .partial folder, not yet renamed), ``save:after_rename`` (renamed, tracker not yet
         updated); with --async-save also ``save:background`` (in the forked writer, before it
         writes: a kill there is a writer that dies, ``hang`` one that never finishes)
actions: ``kill`` (default; SIGKILL to this process: no handler, no cleanup, like a lost node),
         ``enospc`` / ``eacces`` (raise the OSError a full or read-only disk gives),
         ``hang`` (sleep forever: a stuck rank), ``SIG<NAME>`` (send that signal to this
         process, as a scheduler or a user would: the run's own handler takes it; with
         ``group``, to its whole process group -- its loader workers and checkpoint writer
         too -- as Ctrl-C, ``kill -- -PGID`` and SLURM do)

Example: ``LLAVA_FAULT=save:after_model@8`` kills the run while it writes iter_0000008.
"""
import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import List, Optional

ENV_VAR = "LLAVA_FAULT"
POINTS = ("step", "save:start", "save:after_model", "save:after_extras", "save:before_publish",
          "save:after_rename", "save:background")
ACTIONS = ("kill", "enospc", "eacces", "hang")


@dataclass(frozen=True)
class Fault:
    point: str
    iteration: int
    action: str = "kill"
    rank: Optional[int] = None
    to_group: bool = False


def parse_faults(text: str) -> List[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, sep, rest = item.partition("@")
        if not sep:
            raise ValueError(f"{ENV_VAR}={text!r}: '{item}' has no '@<iteration>'")
        fields = rest.split(":")
        action, rank, to_group = "kill", None, False
        for option in fields[1:]:
            if option == "group":
                to_group = True
            elif option.startswith("rank"):
                rank = int(option[4:])
            elif option in ACTIONS or option.startswith("SIG"):
                action = option
            else:
                raise ValueError(f"{ENV_VAR}: unknown option {option!r} in '{item}' "
                                 f"(actions: {', '.join(ACTIONS)}; or rank<N>, group)")
        if where not in POINTS:
            raise ValueError(f"{ENV_VAR}: unknown point {where!r} (points: {', '.join(POINTS)})")
        faults.append(Fault(where, int(fields[0]), action, rank, to_group))
    return faults


def fault_point(point: str, iteration: int, rank: int) -> None:
    """Triggers the fault configured for this point, iteration and rank, if any."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return
    for fault in parse_faults(text):
        if fault.point == point and fault.iteration == iteration and fault.rank in (None, rank):
            _trigger(fault)


def _trigger(fault: Fault) -> None:
    where = f"{fault.point}@{fault.iteration}"
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "hang":
        while True:
            time.sleep(60)
    if fault.action.startswith("SIG"):
        if fault.to_group:
            os.killpg(os.getpgrp(), signal.Signals[fault.action])
        else:
            os.kill(os.getpid(), signal.Signals[fault.action])
        return
    code = errno.ENOSPC if fault.action == "enospc" else errno.EACCES
    raise OSError(code, f"{os.strerror(code)} (injected by {ENV_VAR} at {where})")
