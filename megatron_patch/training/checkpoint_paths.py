"""Where checkpoints live and which one to load; publishing them so a crash never corrupts one.

    $SAVE/iter_0000200/                 one complete checkpoint (dist-checkpoint + our files)
    $SAVE/iter_0000200/COMPLETE         written last inside it
    $SAVE/latest_checkpointed_iteration.txt   the tracker, replaced atomically after publishing

A checkpoint is written under `iter_XXXXXXX.partial-<tag>` and renamed when every rank is done,
so a run killed during a save leaves at most a `.partial` folder, which `--load` ignores (and
says so). Only this module knows these names.
"""
import os
import re
import shutil
from dataclasses import dataclass
from typing import List, Optional

TRACKER_NAME = "latest_checkpointed_iteration.txt"
COMPLETE_MARKER = "COMPLETE"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def checkpoint_dir_around(path: str) -> Optional[str]:
    """The iter_* checkpoint folder that `path` is or lies in, if any."""
    path = os.path.abspath(path)
    while True:
        if _ITER_DIR.match(os.path.basename(path)):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def partial_dir(save: str, iteration: int, tag: str) -> str:
    return os.path.join(save, f"{iteration_dir_name(iteration)}.partial-{tag}")


def is_complete(checkpoint_dir: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER))


def publish(save: str, partial: str, iteration: int, after_rename=None) -> str:
    """Marks `partial` complete, renames it to iter_XXXXXXX, then updates the tracker (rank 0).
    `after_rename` (tests) runs between the rename and the tracker update."""
    with open(os.path.join(partial, COMPLETE_MARKER), "w") as handle:
        handle.write(f"{iteration}\n")
        handle.flush()
        os.fsync(handle.fileno())
    final = os.path.join(save, iteration_dir_name(iteration))
    if os.path.exists(final):  # an older save of the same iteration (e.g. re-run after resume)
        shutil.rmtree(final)
    os.replace(partial, final)
    if after_rename is not None:
        after_rename()
    write_tracker(save, iteration)
    return final


def write_tracker(save: str, iteration: int) -> None:
    temporary = os.path.join(save, f".{TRACKER_NAME}.tmp")
    with open(temporary, "w") as handle:
        handle.write(f"{iteration}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(save, TRACKER_NAME))


def complete_iterations(save: str) -> List[int]:
    if not os.path.isdir(save):
        return []
    found = []
    for name in os.listdir(save):
        match = _ITER_DIR.match(name)
        if match and is_complete(os.path.join(save, name)):
            found.append(int(match.group(1)))
    return sorted(found)


@dataclass
class LoadChoice:
    path: Optional[str]
    iteration: Optional[int]
    notes: List[str]


def choose_checkpoint(load: str) -> LoadChoice:
    """`load` is a run dir (newest complete checkpoint, tracker consulted) or one iter_* dir."""
    notes: List[str] = []
    if _ITER_DIR.match(os.path.basename(os.path.normpath(load))):
        if not is_complete(load):
            raise FileNotFoundError(f"checkpoint {load} is incomplete (no {COMPLETE_MARKER} marker): "
                                    "it was being written when the run died; load its run dir "
                                    "to take the newest complete one")
        return LoadChoice(load, int(os.path.basename(os.path.normpath(load))[5:]), notes)
    complete = complete_iterations(load)
    tracked = _read_tracker(load)
    for name in sorted(os.listdir(load)) if os.path.isdir(load) else []:
        if ".partial-" in name:
            notes.append(f"skipping {name}: a save that did not finish")
        elif _ITER_DIR.match(name) and not is_complete(os.path.join(load, name)):
            notes.append(f"skipping {name}: no {COMPLETE_MARKER} marker")
    if tracked is not None and tracked not in complete:
        notes.append(f"tracker names iteration {tracked}, which is not a complete checkpoint")
    if not complete:
        return LoadChoice(None, None, notes)
    newest = complete[-1]
    if tracked is not None and tracked != newest:
        notes.append(f"tracker says {tracked}, newest complete checkpoint is {newest}: using {newest}")
    return LoadChoice(os.path.join(load, iteration_dir_name(newest)), newest, notes)


def _read_tracker(save: str) -> Optional[int]:
    try:
        with open(os.path.join(save, TRACKER_NAME)) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def remove_old_checkpoints(save: str, keep_last: int) -> List[str]:
    """Deletes all but the newest `keep_last` complete checkpoints (never the newest one)."""
    complete = complete_iterations(save)
    doomed = complete[:-max(1, keep_last)]
    removed = []
    for iteration in doomed:
        path = os.path.join(save, iteration_dir_name(iteration))
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_unfinished_saves(save: str) -> List[str]:
    """Deletes `.partial` folders left by saves that died (call only while no save runs: at
    start-up, before the first step). They can be as large as a checkpoint."""
    if not os.path.isdir(save):
        return []
    removed = []
    for name in sorted(os.listdir(save)):
        if ".partial-" in name and _ITER_DIR.match(name.split(".partial-")[0]):
            shutil.rmtree(os.path.join(save, name), ignore_errors=True)
            removed.append(os.path.join(save, name))
    return removed


def resume_hint(save: str) -> str:
    """Where a failed run can continue from: the newest complete checkpoint in `save`."""
    complete = complete_iterations(save)
    if not complete:
        return f"no complete checkpoint in {save} yet: a rerun starts from the beginning"
    newest = os.path.join(save, iteration_dir_name(complete[-1]))
    return (f"last complete checkpoint: {newest} (iteration {complete[-1]}); rerunning the same "
            "command resumes from it")
