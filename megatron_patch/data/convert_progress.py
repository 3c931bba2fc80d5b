"""Where an interrupted conversion stopped, so that running the same command again goes on.

Converting a large SFT mix (millions of records, each image loaded and verified) takes hours; a
conversion that dies (killed, out of memory, node lost) should not start over. Every
``--commit-interval`` seconds the converter makes a resume point: the open shards are flushed to
disk at a sample boundary (shard_writer), ``skipped.jsonl`` too, then ``.staging/progress.json``
is replaced atomically with how many input records were consumed, the report and split counts
so far, the length of ``skipped.jsonl`` and each shard's committed length.

Run again with the same inputs and options, the converter cuts every file back to that point
and goes on from the next record, so the result is byte for byte the uninterrupted
conversion's. A last point, once every record is converted and every shard closed, lets a run
that dies while publishing the shards or building energon's index (minutes for a large set)
redo only that. The inputs must be unchanged: each input's size and modification time are part
of the point (for a folder, the name, size and modification time of every file in it), and so
is every option that shapes the output (the worker count does not). A point that does not
match, or staging files that do not, are refused with a message; ``--overwrite`` starts over.
"""
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_patch.data.shard_format import SKIPPED_NAME

PROGRESS_NAME = "progress.json"
FORMAT_VERSION = 1

# ConvertOptions fields that change what is written (not workers, progress, overwrite, ...)
_OUTPUT_OPTIONS = ("image_root", "split", "shard_prefix", "max_samples_per_shard",
                   "max_shard_bytes", "record_format", "container", "messages_column",
                   "image_column", "reencode")


@dataclass
class ResumePoint:
    consumed: int          # input records read (converted or skipped) up to the point
    seconds: float         # conversion time spent up to the point
    report: dict           # ConversionReport fields
    split_counts: list     # SplitAssigner counts
    skipped_bytes: int     # length of skipped.jsonl
    writer: dict           # SplitShardWriter.commit()
    all_converted: bool = False  # every record done and every shard closed: publishing is left


def fingerprint(options) -> dict:
    """What must be the same for a conversion to go on from another's point."""
    inputs = []
    for path in options.inputs:
        if os.path.isdir(path):
            inputs.append({"path": os.path.abspath(path), **_folder_fingerprint(path)})
            continue
        status = os.stat(path)
        inputs.append({"path": os.path.abspath(path), "size": status.st_size,
                       "mtime_ns": status.st_mtime_ns})
    settings = {name: getattr(options, name) for name in _OUTPUT_OPTIONS}
    return json.loads(json.dumps({"inputs": inputs, "options": settings}))  # lists, not tuples


def _folder_fingerprint(path: str) -> dict:
    """A folder of per-sample files: name, size and mtime of every file in it, hashed. The
    folder's own mtime changes only when a file is added, removed or renamed, not when one is
    rewritten in place. One stat per file, once per run."""
    digest, count = hashlib.sha256(), 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            status = os.stat(full)
            digest.update(f"{os.path.relpath(full, path)}\0{status.st_size}\0"
                          f"{status.st_mtime_ns}\n".encode())
            count += 1
    return {"files": count, "digest": digest.hexdigest()}


def save(staging: str, point: ResumePoint, options_fingerprint: dict) -> None:
    record = {"format_version": FORMAT_VERSION, "fingerprint": options_fingerprint,
              **asdict(point)}
    path = os.path.join(staging, PROGRESS_NAME)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def find(output_dir: str, staging: str, current: dict) -> Optional[ResumePoint]:
    """The point an interrupted conversion into `output_dir` left, if any; SystemExit with what
    to do if it cannot be resumed by this command (whose `fingerprint` is `current`)."""
    path = os.path.join(staging, PROGRESS_NAME)
    if not os.path.exists(path):
        return None
    start_over = ("; add --overwrite to start over (the interrupted conversion's files in "
                  f"{staging} are removed)")
    try:
        with open(path) as handle:
            record = json.load(handle)
        if record.get("format_version") != FORMAT_VERSION:
            raise SystemExit(f"error: {path} was written by another version of the converter"
                             + start_over)
        saved_fingerprint = record["fingerprint"]
        point = ResumePoint(**{k: v for k, v in record.items()
                               if k not in ("format_version", "fingerprint")})
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SystemExit(f"error: cannot read {path} ({type(error).__name__}: {error})"
                         + start_over) from None
    changed = _differences(saved_fingerprint, current)
    if changed:
        raise SystemExit(f"error: {output_dir} holds an interrupted conversion of other inputs "
                         f"or options ({'; '.join(changed)}); run it again with the same ones "
                         "to go on from where it stopped" + start_over)
    missing = _missing_files(output_dir, staging, point)
    if missing:
        raise SystemExit(f"error: cannot go on with the interrupted conversion in {output_dir}: "
                         f"{missing}" + start_over)
    return point


def _differences(saved: dict, current: dict) -> list:
    changed = []
    saved_inputs = {i["path"]: i for i in saved["inputs"]}
    current_inputs = {i["path"]: i for i in current["inputs"]}
    if list(saved_inputs) != list(current_inputs):
        changed.append(f"inputs were {', '.join(saved_inputs)}")
    else:
        changed += [f"{path} changed since (size or modification time; in a folder, of a file)"
                    for path, was in saved_inputs.items() if current_inputs[path] != was]
    changed += [f"{name} was {value!r}, now {current['options'][name]!r}"
                for name, value in saved["options"].items() if current["options"][name] != value]
    return changed


def _missing_files(output_dir: str, staging: str, point: ResumePoint) -> str:
    """'' if every file the point needs is there, long enough; else what is wrong."""
    needed = [] if point.all_converted else [  # then publishing may have moved them
        (os.path.join(staging, info["name"]), info["bytes"])
        for infos in point.writer["closed"].values() for info in infos]
    needed += [(os.path.join(staging, shard["name"]), shard["length"])
               for shard in point.writer["open"].values()]
    needed.append((os.path.join(output_dir, SKIPPED_NAME), point.skipped_bytes))
    for path, length in needed:
        if not os.path.exists(path) or os.path.getsize(path) < length:
            return f"{path} is missing or shorter than the {length} bytes written before"
    return ""
