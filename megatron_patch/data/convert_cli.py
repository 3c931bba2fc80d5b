"""Command line of the converter (tools/stage2_sftdata2webdataset.py, `llava-sft-convert`).

Exit status: 0 every record converted; 3 done, but some records were skipped (see skipped.jsonl);
1 a fatal error (nothing published), or any skip with --strict (no index published); 2 bad
arguments.
"""
import argparse
import errno
import os
import re
import shutil
import sys

from megatron_patch.data.convert import ConvertOptions, convert
from megatron_patch.data.energon_index import META_DIR
from megatron_patch.data.image_bytes import REENCODE_CHOICES
from megatron_patch.data.readers import CONTAINER_FORMATS, FILE_CUT_SHORT
from megatron_patch.data.records import RECORD_FORMATS
from megatron_patch.data.shard_format import DEFAULT_SHARD_PREFIX, SKIPPED_NAME
from megatron_patch.training.arguments import positive_int

EXIT_SKIPPED = 3
_SIZE_UNITS = {"": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GiB, 3000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_split(text: str) -> list:
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a split: {text!r} (e.g. 98,2 or 90,5,5)") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"not a split: {text!r}: 1-3 non-negative weights "
                                         "for train,val,test")
    return weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert LLaVA-style SFT data (JSON, JSONL, Parquet or a folder of JSON files) "
                    "into WebDataset shards with an energon .nv-meta index.")
    p.add_argument("inputs", nargs="+", help="input files or folders; several are concatenated")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--image-root", help="folder that relative image paths start from "
                                        "(default: each input file's own folder)")
    p.add_argument("--split", type=parse_split, default=[98.0, 2.0],
                   help="train,val[,test] weights, per sample (default 98,2)")
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="processes that load and verify images (default: min(8, cores))")
    p.add_argument("--shard-prefix", default=DEFAULT_SHARD_PREFIX)
    p.add_argument("--max-samples-per-shard", type=positive_int, default=5000)
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("1GiB"),
                   help="roll to a new shard past this size (e.g. 500MB)")
    p.add_argument("--input-format", choices=("auto",) + RECORD_FORMATS + CONTAINER_FORMATS,
                   default="auto", help="force a record shape (llava, messages, vqa) or a "
                                        "container (json, jsonl, parquet, folder)")
    p.add_argument("--messages-column", help="Parquet column with the conversation")
    p.add_argument("--image-column", help="Parquet column with the image bytes")
    p.add_argument("--reencode", choices=REENCODE_CHOICES, default="none",
                   help="store images re-encoded in this format (default: original bytes)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous conversion in --output-dir, or start an interrupted "
                        "one over (run without it, an interrupted one goes on where it stopped)")
    p.add_argument("--commit-interval", type=float, default=30.0, metavar="SECONDS",
                   help="how often the point an interrupted conversion goes on from is saved "
                        "(default 30)")
    p.add_argument("--strict", action="store_true",
                   help="any skipped record is an error: the energon index (.nv-meta) is not "
                        "published, so nothing can train on the shards")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [path for path in args.inputs if not os.path.exists(path)]
    if missing:
        parser.error(f"input not found: {', '.join(missing)}")
    options = ConvertOptions(
        inputs=args.inputs, output_dir=args.output_dir, image_root=args.image_root,
        split=args.split, workers=args.workers, shard_prefix=args.shard_prefix,
        max_samples_per_shard=args.max_samples_per_shard, max_shard_bytes=args.max_shard_size,
        record_format=args.input_format if args.input_format in RECORD_FORMATS else None,
        container=args.input_format if args.input_format in CONTAINER_FORMATS else None,
        messages_column=args.messages_column, image_column=args.image_column,
        reencode=args.reencode, overwrite=args.overwrite, progress=not args.no_progress,
        commit_seconds=args.commit_interval)
    try:
        report = convert(options)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to go on from the last commit point (at "
              f"most --commit-interval {args.commit_interval:g} s back)", file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"error: the disk of {args.output_dir} is full ({error}): free space (or choose "
              "another --output-dir) and rerun the same command: the conversion goes on from "
              "its last commit point, to the same shards", file=sys.stderr)
        return 1
    print_summary(report, args.output_dir)
    if report.skipped and args.strict:
        shutil.rmtree(os.path.join(args.output_dir, META_DIR), ignore_errors=True)
        print(f"error: --strict: {report.skipped} record(s) skipped, index not published",
              file=sys.stderr)
        return 1
    return EXIT_SKIPPED if report.skipped else 0


def print_summary(report, output_dir: str) -> None:
    samples = report.samples
    print(f"converted {sum(samples.values())} samples (train {samples['train']}, "
          f"val {samples['val']}, test {samples['test']}) into {len(report.shards)} shard(s) "
          f"in {output_dir}")
    print(f"images: {report.images} ({report.image_bytes / 1e6:.1f} MB), re-encoded "
          f"{report.images_reencoded}; <image> tags prepended to {report.image_tags_prepended} "
          "record(s) whose text had none")
    print(f"speed: {report.samples_per_second} samples/s, {report.megabytes_per_second} MB/s "
          f"({report.seconds} s)")
    if report.skipped:
        kinds = ", ".join(f"{k} {n}" for k, n in report.skipped_by_kind.items())
        print(f"SKIPPED {report.skipped} record(s): {kinds}; each with its source line and reason "
              f"in {os.path.join(output_dir, SKIPPED_NAME)}", file=sys.stderr)
        cut_short = report.skipped_by_kind.get(FILE_CUT_SHORT)
        if cut_short:
            print(f"{FILE_CUT_SHORT}: {cut_short} .json file(s) stopped being valid JSON; the "
                  "records after the error were not read at all (not counted above): fix the "
                  "file and convert again", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
