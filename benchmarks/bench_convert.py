"""Converter throughput: samples/s and MB/s on a synthetic LLaVA set (figures for docs/BENCHMARKS.md).

    python benchmarks/bench_convert.py --samples 20000 --workers 1 2

Images are made once (a pool of distinct JPEG and PNG files of 224-448 px, referenced by many
records, as real SFT sets reuse COCO-style folders), then the converter runs once per worker count.
"""
import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time

from PIL import Image

from megatron_patch.data.convert import ConvertOptions, convert


def make_dataset(root: str, samples: int, distinct_images: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    names = []
    for index in range(distinct_images):
        side_w, side_h = rng.choice((224, 336, 448)), rng.choice((224, 336, 448))
        image = Image.effect_noise((side_w, side_h), 40).convert("RGB")
        name = f"images/{index:05d}." + ("jpg" if index % 3 else "png")
        image.save(os.path.join(root, name), quality=90)
        names.append(name)
    with open(os.path.join(root, "data.jsonl"), "w") as handle:
        for index in range(samples):
            n_images = rng.choice((0, 1, 1, 1, 2))
            record = {"id": index, "image": [rng.choice(names) for _ in range(n_images)],
                      "conversations": [
                          {"from": "human", "value": "<image>\n" * n_images + "Describe it."},
                          {"from": "gpt", "value": "A noisy picture. " * rng.randint(1, 20)}]}
            handle.write(json.dumps(record) + "\n")
    return os.path.join(root, "data.jsonl")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--distinct-images", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--input", help="convert this file instead of a synthetic set")
    parser.add_argument("--image-root")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_convert_")
    try:
        source = args.input or make_dataset(work, args.samples, args.distinct_images)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"input: {source}")
        for workers in args.workers:
            out = os.path.join(work, f"out{workers}")
            started = time.perf_counter()
            report = convert(ConvertOptions(inputs=[source], output_dir=out, workers=workers,
                                            image_root=args.image_root, progress=False))
            seconds = time.perf_counter() - started
            total = sum(report.samples.values())
            megabytes = sum(s["bytes"] for s in report.shards) / 1e6
            print(f"workers={workers}: {total} samples, {megabytes:.1f} MB of shards in "
                  f"{seconds:.1f} s -> {total / seconds:.0f} samples/s, {megabytes / seconds:.1f} MB/s "
                  f"(skipped {report.skipped})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
