"""Command line of the inspector (tools/inspect_webdataset.py, `llava-sft-inspect`).

Exit status: 0 no problem found; 1 problems found (each printed, naming its shard and sample);
2 bad arguments (unknown split, tokenizer not loadable, not a directory).
Without --validate the checks that need no image decoding still run (index, manifest, tar
readability, json, `<image>` tags, image headers); --validate also decodes every image fully
and reads each split through energon, as the trainer will.
"""
import argparse
import json
import os
import sys

from megatron_patch.data.image_processing import ImageGeometry
from megatron_patch.data.inspect_render import format_sample, format_summary, write_html
from megatron_patch.data.inspect_stats import TokenCounter
from megatron_patch.data.inspector import InspectOptions, inspect_dataset

EXIT_PROBLEMS, EXIT_USAGE = 1, 2
DEFAULT_HTML_SAMPLES = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Inspect a converted dataset (WebDataset shards + energon .nv-meta): counts, "
                    "parts, images, turns, text and token lengths; --validate checks everything.")
    p.add_argument("dataset_dir")
    p.add_argument("--split", default="all", help="train, val, test or all (default all)")
    p.add_argument("--validate", action="store_true",
                   help="decode every image, check the manifest, read through energon; "
                        "exit 1 naming every bad shard/sample")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print the first N samples")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page with "
                   f"thumbnails of the first --show N samples (default {DEFAULT_HTML_SAMPLES})")
    p.add_argument("--tokenizer", metavar="DIR", help="local tokenizer dir (tokenizer.json) or "
                   "SentencePiece .model: adds token lengths; never downloads")
    p.add_argument("--seq-length", type=int, help="count samples longer than this (needs "
                                                  "--tokenizer)")
    p.add_argument("--max-pixels", type=int, default=ImageGeometry.max_pixels,
                   help=f"image pixel budget for image tokens (default {ImageGeometry.max_pixels})")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON on stdout")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = InspectOptions(
            splits=None if args.split == "all" else [args.split], validate=args.validate,
            keep_samples=max(args.show, DEFAULT_HTML_SAMPLES if args.html and not args.show else 0),
            tokens=_token_counter(args), seq_length=args.seq_length,
            progress=not args.no_progress)
        report = inspect_dataset(args.dataset_dir, options)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stderr if args.json else sys.stdout   # with --json, stdout holds only the JSON
    for checked in report.samples[:args.show]:
        print(format_sample(checked), file=out)
    if args.html:
        thumbnails = write_html(args.html, args.dataset_dir, report.samples)
        print(f"wrote {args.html}: {len(report.samples)} samples, {thumbnails} thumbnails",
              file=out)
    if args.json:
        payload = dict(report.stats, dataset=os.path.abspath(args.dataset_dir),
                       validated=args.validate, problem_list=[
                           {"shard": p.shard, "key": p.key, "message": p.message}
                           for p in report.problems])
        print(json.dumps(payload, indent=1))
    else:
        print(format_summary(args.dataset_dir, report.stats, report.problems, args.validate))
    if report.problems and args.json:
        print(f"{len(report.problems)} problem(s); first: {report.problems[0]}", file=sys.stderr)
    return EXIT_PROBLEMS if report.problems else 0


def _token_counter(args):
    if args.tokenizer is None:
        if args.seq_length is not None:
            raise ValueError("--seq-length needs --tokenizer to count tokens")
        return None
    from megatron_patch.data.tokenizer import SFTTokenizer
    return TokenCounter(SFTTokenizer(args.tokenizer), ImageGeometry(max_pixels=args.max_pixels))


if __name__ == "__main__":
    sys.exit(main())
