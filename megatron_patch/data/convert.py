"""LLaVA-style SFT data -> WebDataset shards + energon index: the conversion, top-down.

    read records (main process, streaming) -> normalise + load and verify images (worker pool)
    -> assign a split -> write shards into staging -> publish shards -> energon index -> report

Bad records are skipped, written with their source and reason to `skipped.jsonl` as they happen,
and summed up in `conversion_report.json`; they never stop the run. Output order is the input
order whatever `workers` is, so the same input always gives byte-identical shards.
"""
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from tqdm import tqdm

from megatron_patch.data.energon_index import META_DIR, write_energon_index
from megatron_patch.data.errors import BadRecord
from megatron_patch.data.image_bytes import load_image_bytes, verified_image
from megatron_patch.data.readers import RawRecord, ReaderOptions, read_records
from megatron_patch.data.records import normalize_record
from megatron_patch.data.shard_format import (DEFAULT_SHARD_PREFIX, JSON_PART, REPORT_NAME,
                                              SKIPPED_NAME, SPLITS, encode_sample_json,
                                              image_part_name, sample_key)
from megatron_patch.data.shard_writer import STAGING_DIR, SplitShardWriter


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


def convert(options: ConvertOptions) -> ConversionReport:
    started = time.perf_counter()
    _prepare_output_dir(options.output_dir, options.overwrite)
    report = ConversionReport()
    writer = SplitShardWriter(options.output_dir, options.max_samples_per_shard,
                              options.max_shard_bytes)
    splitter = SplitAssigner(options.split)
    try:
        with open(os.path.join(options.output_dir, SKIPPED_NAME), "w") as skipped_file, \
                _worker_map(options) as mapped:
            for result in tqdm(mapped, unit=" samples", disable=not options.progress,
                               desc="converting"):
                if result.parts is None:
                    _record_skip(report, skipped_file, result)
                    continue
                split = splitter.next_split()
                index = sum(report.samples.values())
                writer.write(split, sample_key(options.shard_prefix, index), result.parts)
                _count_sample(report, split, result)
        shards = writer.publish(options.shard_prefix)
    except BaseException:
        writer.abandon()
        raise
    if not shards:
        raise SystemExit(f"error: no sample could be converted; see "
                         f"{os.path.join(options.output_dir, SKIPPED_NAME)} for the reasons")
    write_energon_index(options.output_dir, shards, workers=max(1, options.workers))
    report.shards = [asdict(s) for s in shards]
    _finish_report(report, started, options.output_dir)
    return report


class SplitAssigner:
    """Deterministic per-sample split: each sample goes to the split furthest behind its share,
    so the counts track the ratio exactly at every prefix of the input (no randomness, no need to
    know the total in advance)."""

    def __init__(self, ratio: Sequence[float]):
        ratio = list(ratio) + [0.0] * (len(SPLITS) - len(ratio))
        total = sum(ratio)
        if total <= 0 or any(r < 0 for r in ratio) or len(ratio) > len(SPLITS):
            raise ValueError(f"invalid split {ratio}: give up to {len(SPLITS)} non-negative "
                             "weights for train,val,test, e.g. 98,2")
        self.shares = [r / total for r in ratio]
        self.counts = [0] * len(SPLITS)

    def next_split(self) -> str:
        seen = sum(self.counts) + 1
        deficits = [share * seen - count for share, count in zip(self.shares, self.counts)]
        chosen = max(range(len(SPLITS)), key=lambda i: (deficits[i], -i))
        self.counts[chosen] += 1
        return SPLITS[chosen]


def _prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses a non-empty output dir unless told; with --overwrite removes only what a
    conversion writes (shards, indexes, reports), never the user's other files."""
    os.makedirs(output_dir, exist_ok=True)
    existing = [n for n in os.listdir(output_dir) if n != STAGING_DIR]
    if not existing:
        return
    if not overwrite:
        raise SystemExit(f"error: output dir {output_dir} is not empty ({len(existing)} entries, "
                         f"e.g. {sorted(existing)[0]}); pass --overwrite to replace a previous "
                         "conversion, or choose an empty dir")
    for name in existing:
        path = os.path.join(output_dir, name)
        if name == META_DIR:
            shutil.rmtree(path)
        elif name.endswith((".tar", ".tar.idx")) or name in (SKIPPED_NAME, REPORT_NAME):
            os.remove(path)


def _iter_raw_records(options: ConvertOptions):
    reader_options = ReaderOptions(image_root=options.image_root, container=options.container,
                                   messages_column=options.messages_column,
                                   image_column=options.image_column)
    for path in options.inputs:
        yield from ((raw, options.record_format, options.reencode)
                    for raw in read_records(path, reader_options))


class _worker_map:
    """Ordered map of `_convert_one` over the input: in-process for workers<=1, else a pool."""

    def __init__(self, options: ConvertOptions):
        self.options, self.pool = options, None

    def __enter__(self):
        items = _iter_raw_records(self.options)
        if self.options.workers <= 1:
            return map(_convert_one, items)
        self.pool = multiprocessing.get_context("fork").Pool(self.options.workers)
        return self.pool.imap(_convert_one, items, chunksize=16)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()


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
        record_id = raw.record.get("id") if isinstance(raw.record, dict) else None
        return _Converted(raw.source, record_id=record_id, error_kind=error.kind, error=str(error))


def _record_skip(report: ConversionReport, skipped_file, result: _Converted) -> None:
    report.skipped += 1
    report.skipped_by_kind[result.error_kind] = report.skipped_by_kind.get(result.error_kind, 0) + 1
    entry = {"source": result.source, "id": result.record_id, "kind": result.error_kind,
             "reason": result.error}
    skipped_file.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
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
