"""CPU data-side figures: loader samples/s through the trainer's task encoder with packing, at
several worker counts, and packing efficiency (demo data and a long-tailed synthetic mix).

    python tools/make_demo_dataset.py --output-dir D --num-samples 2000 --tokenizer-dir T
    python tools/stage2_sftdata2webdataset.py D/demo.json --image-root D --output-dir W --split 90,10
    python benchmarks/bench_data_throughput.py --data-path W --tokenizer-path T --workers 0 1 2

Loader: ``megatron_patch.data.sft_loader.build_train_loader`` with ``SFTTaskEncoder`` (images
decoded and resized, chat template rendered, packs planned from energon's packing buffer,
micro-batches collated) -- exactly what the trainer iterates. The first micro-batch is timed
separately (worker start-up, buffer fill); the rate is over the next ``--batches`` micro-batches.

Packing efficiency = real tokens / (packed sequences x seq_length). The synthetic mix draws
lognormal lengths (median ~545 tokens, sigma 0.9, clipped to [16, capacity]) and one image per
sample, and plans packs with ``plan_packs`` over buffers of ``--buffer`` samples, as the encoder
does with its packing buffer.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.benchmarking.synthetic import long_tailed_lengths  # noqa: E402
from megatron_patch.data.packing import plan_packs  # noqa: E402


def loader_rate(data_path: str, tokenizer_path: str, workers: int, seq_length: int,
                batches: int, max_images: int, seed: int = 1234) -> dict:
    from megatron_patch.data.sft_loader import build_train_loader, close_loader
    from megatron_patch.data.sft_task_encoder import EncoderSettings, SFTTaskEncoder
    from megatron_patch.data.tokenizer import SFTTokenizer

    encoder = SFTTaskEncoder(SFTTokenizer(tokenizer_path), EncoderSettings(
        seq_length=seq_length, packing=True, pad_to_seq_length=True,
        max_images_per_pack=max_images))
    started = time.perf_counter()
    loader = build_train_loader(data_path, encoder, 1, num_workers=workers, seed=seed,
                                shuffle_buffer_size=100)
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - started
    samples = tokens = capacity = images = 0
    timed = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        samples += batch.num_samples
        tokens += batch.real_tokens
        capacity += batch.capacity
        images += batch.num_images
    seconds = time.perf_counter() - timed
    close_loader(loader)
    return {"workers": workers, "seq_length": seq_length, "first_batch_s": round(first, 3),
            "micro_batches": batches, "samples": samples, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1),
            "micro_batches_per_s": round(batches / seconds, 2),
            "tokens_per_s": round(tokens / seconds),
            "packing_efficiency": round(tokens / capacity, 4),
            "samples_per_sequence": round(samples / batches, 2),
            "images_per_sequence": round(images / batches, 2)}


def synthetic_packing(count: int, capacity: int, buffer: int, max_images: int,
                      seed: int = 0) -> dict:
    lengths = long_tailed_lengths(count, seed=seed, capacity=capacity)
    packs, started = 0, time.perf_counter()
    for start in range(0, count, buffer):
        chunk = lengths[start:start + buffer]
        packs += len(plan_packs(chunk, [1] * len(chunk), capacity, max_images))
    seconds = time.perf_counter() - started
    return {"samples": count, "capacity": capacity, "buffer": buffer, "max_images": max_images,
            "mean_length": round(sum(lengths) / count, 1),
            "packing_efficiency": round(sum(lengths) / (packs * capacity), 4),
            "samples_per_sequence": round(count / packs, 2),
            "planner_ms_per_1000_samples": round(1000 * seconds / count * 1000, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", help="converted demo dataset (skip the loader figures without)")
    p.add_argument("--tokenizer-path")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seq-length", type=int, nargs="+", default=[1024])
    p.add_argument("--batches", type=int, default=100, help="timed micro-batches per setting")
    p.add_argument("--max-images-per-pack", type=int, default=32)
    p.add_argument("--synthetic-samples", type=int, default=20000)
    p.add_argument("--synthetic-capacity", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--buffer", type=int, nargs="+", default=[64, 256])
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    report = {"loader": [], "synthetic_packing": []}
    if args.data_path:
        for seq_length in args.seq_length:
            for workers in args.workers:
                row = loader_rate(args.data_path, args.tokenizer_path, workers, seq_length,
                                  args.batches, args.max_images_per_pack)
                report["loader"].append(row)
                print(json.dumps(row), flush=True)
    for capacity in args.synthetic_capacity:
        for buffer in args.buffer:
            row = synthetic_packing(args.synthetic_samples, capacity, buffer, 64)
            report["synthetic_packing"].append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
