"""LLaVA-style SFT data -> WebDataset shards + energon index: the conversion, top-down.

    read records (main process, streaming) -> normalise + load and verify images (worker pool)
    -> assign a split -> write shards into staging (resume points) -> publish shards
    -> energon index -> report

Bad records are skipped, written with their source and reason to `skipped.jsonl` as they happen,
and summed up in `conversion_report.json`; they never stop the run. Output order is the input
order whatever `workers` is, so the same input always gives byte-identical shards, and a
conversion that died goes on from its last resume point when run again (convert_progress).
"""
import itertools
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from tqdm import tqdm

from megatron_patch.data import convert_progress
from megatron_patch.data.convert_progress import ResumePoint
from megatron_patch.data.energon_index import META_DIR, write_energon_index
from megatron_patch.data.errors import BadRecord
from megatron_patch.data.image_bytes import load_image_bytes, verified_image
from megatron_patch.data.ordered_pool import OrderedProcessMap, WorkerDied
from megatron_patch.data.readers import RawRecord, ReaderOptions, read_records
from megatron_patch.data.records import normalize_record
from megatron_patch.data.shard_format import (DEFAULT_SHARD_PREFIX, JSON_PART, MANIFEST_NAME,
                                              REPORT_NAME, SKIPPED_NAME, SPLITS,
                                              encode_sample_json, image_part_name, sample_key)
from megatron_patch.data.shard_writer import STAGING_DIR, SplitShardWriter
from megatron_patch.folder_lock import FolderInUse, hold_folder


@dataclass
class ConvertOptions:
    inputs: Sequence[str]
    output_dir: str
    image_root: Optional[str] = None
    split: Sequence[float] = (98.0, 2.0, 0.0)
    workers: int = 1
    shard_prefix: str = DEFAULT_SHARD_PREFIX
    max_samples_per_shard: int = 5000
    max_shard_bytes: int = 1 << 30
    record_format: Optional[str] = None   # llava | messages | vqa; None: per record
    container: Optional[str] = None       # json | jsonl | parquet | folder; None: per input
    messages_column: Optional[str] = None
    image_column: Optional[str] = None
    reencode: str = "none"
    overwrite: bool = False
    progress: bool = True
    commit_seconds: float = 30.0          # how often a resume point is made


@dataclass
class ConversionReport:
    samples: dict = field(default_factory=lambda: {split: 0 for split in SPLITS})
    skipped: int = 0
    skipped_by_kind: dict = field(default_factory=dict)
    image_tags_prepended: int = 0
    images: int = 0
    images_reencoded: int = 0
    image_bytes: int = 0
    shards: list = field(default_factory=list)
    seconds: float = 0.0
    samples_per_second: float = 0.0
    megabytes_per_second: float = 0.0


@dataclass
class _Converted:
    """What a worker returns: the tar parts of one sample, or why it was skipped."""
    source: str
    parts: Optional[dict] = None
    record_id: object = None
    error_kind: Optional[str] = None
    error: Optional[str] = None
    prepended_tags: bool = False
    reencoded: int = 0


CONVERT_LOCK = ".convert.lock"


def convert(options: ConvertOptions) -> ConversionReport:
    fingerprint = convert_progress.fingerprint(options)  # the inputs as this run finds them
    try:
        lock = hold_folder(options.output_dir, CONVERT_LOCK, refusal=(
            f"error: another conversion ({{holder}}) is writing to {options.output_dir}: wait for "
            "it to end (or stop it: rerunning then goes on with it), or choose another "
            "--output-dir"))
    except FolderInUse as error:
        raise SystemExit(str(error)) from None
    try:
        return _convert(options, fingerprint)
    finally:
        lock.close()


def _convert(options: ConvertOptions, fingerprint: dict) -> ConversionReport:
    resume = _prepare_output_dir(options, fingerprint)
    conversion = _Conversion(options, resume, fingerprint)
    if resume is None or not resume.all_converted:
        conversion.convert_records()
    shards = conversion.writer.publish(options.shard_prefix)
    if not shards:
        conversion.writer.remove_staging()
        raise SystemExit(f"error: no sample could be converted; see "
                         f"{os.path.join(options.output_dir, SKIPPED_NAME)} for the reasons")
    write_energon_index(options.output_dir, shards, workers=max(1, options.workers))
    report = conversion.report
    report.shards = [asdict(s) for s in shards]
    _finish_report(report, conversion.started, options.output_dir)
    conversion.writer.remove_staging()  # the resume point last: all of the above is redone
    return report


class _Conversion:
    """What a conversion has done so far: input records consumed, the report, the split counts
    and the shards, from the start or from a resume point (convert_progress)."""

    def __init__(self, options: ConvertOptions, resume: Optional[ResumePoint], fingerprint: dict):
        self.options, self.resume, self.fingerprint = options, resume, fingerprint
        self.started = time.perf_counter() - (resume.seconds if resume else 0.0)
        self.report = ConversionReport(**resume.report) if resume else ConversionReport()
        self.writer = SplitShardWriter(options.output_dir, options.max_samples_per_shard,
                                       options.max_shard_bytes, resume.writer if resume else None)
        self.splitter = SplitAssigner(options.split, resume.split_counts if resume else None)
        self.consumed = resume.consumed if resume else 0

    def convert_records(self) -> None:
        """Converts every input record after the resume point, making a new point every
        `commit_seconds`; ends with the shards closed and a point that says so, from which a
        rerun only publishes."""
        options = self.options
        try:
            with _open_skipped_file(options.output_dir, self.resume) as skipped_file, \
                    _worker_map(options, skip=self.consumed) as mapped:
                last_point = time.monotonic() if self.resume else self._save_point(skipped_file)
                for result in tqdm(mapped, unit=" samples", disable=not options.progress,
                                   desc="converting", initial=self.consumed):
                    self._take(result, skipped_file)
                    if time.monotonic() - last_point >= options.commit_seconds:
                        last_point = self._save_point(skipped_file)
                self.writer.close_all()
                self._save_point(skipped_file, all_converted=True)
        except WorkerDied as error:
            self.writer.abandon()
            raise SystemExit(
                f"error: {error}, with record {self.consumed + 1} of the input or one of the "
                f"next few. The shards up to the last resume point stay in "
                f"{options.output_dir}: run the same command again to go on from there (with "
                f"--workers 1 a record that crashes the converter shows in the traceback)"
            ) from error
        except BaseException:
            self.writer.abandon()
            raise

    def _take(self, result: _Converted, skipped_file) -> None:
        self.consumed += 1
        if result.parts is None:
            _record_skip(self.report, skipped_file, result)
            return
        split = self.splitter.next_split()
        index = sum(self.report.samples.values())
        self.writer.write(split, sample_key(self.options.shard_prefix, index), result.parts)
        _count_sample(self.report, split, result)

    def _save_point(self, skipped_file, all_converted: bool = False) -> float:
        point = ResumePoint(self.consumed, time.perf_counter() - self.started,
                            asdict(self.report), list(self.splitter.counts),
                            _flushed(skipped_file), self.writer.commit(), all_converted)
        convert_progress.save(self.writer.staging, point, self.fingerprint)
        return time.monotonic()


class SplitAssigner:
    """Deterministic per-sample split: each sample goes to the split furthest behind its share,
    so the counts track the ratio exactly at every prefix of the input (no randomness, no need to
    know the total in advance)."""

    def __init__(self, ratio: Sequence[float], counts: Optional[Sequence[int]] = None):
        ratio = list(ratio) + [0.0] * (len(SPLITS) - len(ratio))
        total = sum(ratio)
        if total <= 0 or any(r < 0 for r in ratio) or len(ratio) > len(SPLITS):
            raise ValueError(f"invalid split {ratio}: give up to {len(SPLITS)} non-negative "
                             "weights for train,val,test, e.g. 98,2")
        self.shares = [r / total for r in ratio]
        self.counts = list(counts) if counts is not None else [0] * len(SPLITS)

    def next_split(self) -> str:
        seen = sum(self.counts) + 1
        deficits = [share * seen - count for share, count in zip(self.shares, self.counts)]
        chosen = max(range(len(SPLITS)), key=lambda i: (deficits[i], -i))
        self.counts[chosen] += 1
        return SPLITS[chosen]


def _prepare_output_dir(options: ConvertOptions, fingerprint: dict) -> Optional[ResumePoint]:
    """The resume point of an interrupted conversion of the same inputs into the output dir, if
    any. Else refuses a non-empty output dir unless told; with --overwrite removes only what a
    conversion writes (shards, indexes, reports, staging), never the user's other files."""
    output_dir, overwrite = options.output_dir, options.overwrite
    os.makedirs(output_dir, exist_ok=True)
    staging = os.path.join(output_dir, STAGING_DIR)
    resume = None if overwrite else convert_progress.find(output_dir, staging, fingerprint)
    if resume is not None:
        samples = sum(resume.report["samples"].values())
        print(f"going on with the interrupted conversion in {output_dir} after input record "
              f"{resume.consumed} ({samples} samples and {resume.report['skipped']} skips so "
              "far; --overwrite starts over)", file=sys.stderr)
        return resume
    existing = [n for n in os.listdir(output_dir) if n not in (STAGING_DIR, CONVERT_LOCK)]
    if set(existing) <= {SKIPPED_NAME}:  # what a conversion that converted nothing leaves
        return None                       # (rewritten by this one)
    if not overwrite:
        raise SystemExit(f"error: output dir {output_dir} is not empty ({len(existing)} entries, "
                         f"e.g. {sorted(existing)[0]}); pass --overwrite to replace a previous "
                         "conversion, or choose an empty dir")
    ours = _previous_shards(output_dir, options.shard_prefix)
    for name in existing:
        path = os.path.join(output_dir, name)
        if name == META_DIR:
            shutil.rmtree(path)
        elif name.removesuffix(".idx") in ours or name in (SKIPPED_NAME, REPORT_NAME):
            os.remove(path)
    return None


def _previous_shards(output_dir: str, prefix: str) -> set:
    """The shards a conversion wrote here: those its manifest lists, and any named as this
    conversion names them; a tar of the user's own in the folder is not one of them."""
    names = {name for name in os.listdir(output_dir)
             if re.fullmatch(re.escape(prefix) + r"-\d{5}\.tar", name)}
    try:
        with open(os.path.join(output_dir, META_DIR, MANIFEST_NAME)) as handle:
            names.update(json.load(handle)["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return names


def _open_skipped_file(output_dir: str, resume: Optional[ResumePoint]):
    """skipped.jsonl, new or cut back to the resume point's length."""
    path = os.path.join(output_dir, SKIPPED_NAME)
    if resume is None:
        return open(path, "wb")
    os.truncate(path, resume.skipped_bytes)
    return open(path, "ab")


def _flushed(skipped_file) -> int:
    skipped_file.flush()
    os.fsync(skipped_file.fileno())
    return skipped_file.tell()


def _iter_raw_records(options: ConvertOptions):
    reader_options = ReaderOptions(image_root=options.image_root, container=options.container,
                                   messages_column=options.messages_column,
                                   image_column=options.image_column)
    for path in options.inputs:
        yield from ((raw, options.record_format, options.reencode)
                    for raw in read_records(path, reader_options))


class _worker_map:
    """Ordered map of `_convert_one` over the input: in-process for workers<=1, else worker
    processes (ordered_pool: clean workers, a dead one is an error rather than a hang)."""

    def __init__(self, options: ConvertOptions, skip: int = 0):
        self.options, self.skip, self.pool = options, skip, None

    def __enter__(self):
        # the records before a resume point are read again (cheap) but not converted
        items = itertools.islice(_iter_raw_records(self.options), self.skip, None)
        if self.options.workers <= 1:
            return map(_convert_one, items)
        self.pool = OrderedProcessMap(_convert_one, self.options.workers, preload=[__name__])
        return self.pool.map(items)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.__exit__(*exc)


def _convert_one(item) -> _Converted:
    raw, record_format, reencode = item
    raw: RawRecord
    try:
        if raw.error is not None:
            raise raw.error
        conversation = normalize_record(raw.record, record_format, raw.fallback_id)
        parts, names, reencoded = {}, [], 0
        for position, source in enumerate(conversation.images):
            data = load_image_bytes(source, raw.search_dirs)
            data, ext, was_reencoded = verified_image(data, source.describe(), reencode)
            name = image_part_name(position, ext)
            parts[name] = data
            names.append(name)
            reencoded += was_reencoded
        sample = {"id": conversation.id, "conversations": conversation.turns, "images": names,
                  "source": raw.source}
        if conversation.meta:
            sample["meta"] = conversation.meta
        parts[JSON_PART] = encode_sample_json(sample)
        return _Converted(raw.source, parts, conversation.id,
                          prepended_tags=conversation.prepended_image_tags, reencoded=reencoded)
    except BadRecord as error:
        return _Converted(raw.source, record_id=_record_id(raw), error_kind=error.kind,
                          error=str(error))
    except UnicodeError as error:  # a lone surrogate (valid JSON: "\ud800") in a text or a path
        return _Converted(raw.source, record_id=_record_id(raw), error_kind="invalid_text",
                          error=f"the record holds text that is not valid Unicode ({error}); "
                                "fix it in the source")


def _record_id(raw):
    return raw.record.get("id") if isinstance(raw.record, dict) else None


def _record_skip(report: ConversionReport, skipped_file, result: _Converted) -> None:
    report.skipped += 1
    report.skipped_by_kind[result.error_kind] = report.skipped_by_kind.get(result.error_kind, 0) + 1
    entry = {"source": result.source, "id": result.record_id, "kind": result.error_kind,
             "reason": result.error}
    skipped_file.write((json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode())
    skipped_file.flush()


def _count_sample(report: ConversionReport, split: str, result: _Converted) -> None:
    report.samples[split] += 1
    report.image_tags_prepended += result.prepended_tags
    report.images_reencoded += result.reencoded
    images = [v for k, v in result.parts.items() if k != JSON_PART]
    report.images += len(images)
    report.image_bytes += sum(len(v) for v in images)


def _finish_report(report: ConversionReport, started: float, output_dir: str) -> None:
    report.seconds = round(time.perf_counter() - started, 3)
    total = sum(report.samples.values())
    total_bytes = sum(s["bytes"] for s in report.shards)
    report.samples_per_second = round(total / max(report.seconds, 1e-9), 1)
    report.megabytes_per_second = round(total_bytes / 1e6 / max(report.seconds, 1e-9), 2)
    report.skipped_by_kind = dict(Counter(report.skipped_by_kind).most_common())
    with open(os.path.join(output_dir, REPORT_NAME), "w") as handle:
        json.dump(asdict(report), handle, indent=1)
