"""Checkpoint conversion memory: peak RSS vs checkpoint size, HF -> megatron and back.

    python benchmarks/bench_convert_checkpoint.py [--model llava-ov-1.5-4b] [--num-layers 8]
        [--workdir /tmp/bench_ckpt] [--max-shard-size 1GB] [--keep]

A synthetic bf16 checkpoint with the real key names and shapes of ``--model`` (``--num-layers``
language layers, to fit "a few GB" on a laptop-class machine; ``--num-layers 0`` is the full
preset, ~9.4 GB for the 4B) is written as 2 GB safetensors shards. Each conversion runs as its
own process (the library code, through ``--worker``); its peak RSS is the kernel's high-water
mark, read with ``wait4`` (exact, no sampling). The writer processes megatron's checkpoint saver
forks share the converter's pages copy-on-write and only read them, so they add no copy.

Expected: HF -> mcore peaks at about one copy of the weights plus the largest tensor (the
embedding) plus the runtime; mcore -> HF at about a read batch (512 MB) plus the largest tensor
times three (torch DCP reads a chunk into bytes, unpickles it, then copies it into place).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.model.configs import get_config  # noqa: E402


def model_config(args):
    """``--model`` with ``--num-layers`` language layers (a custom config, passed to the API)."""
    overrides = {"num_layers": args.num_layers} if args.num_layers else {}
    cfg = get_config(args.model, overrides)
    if overrides:
        cfg.name = f"{args.model}-{args.num_layers}layers"
    return cfg


def write_synthetic_checkpoint(cfg, directory: str) -> int:
    """Random bf16 tensors under every HF name of ``cfg``; returns the bytes written."""
    from megatron_patch.checkpoint_conversion.hf_config import hf_config_for
    from megatron_patch.checkpoint_conversion.hf_files import ShardedWriter
    from megatron_patch.checkpoint_conversion.runtime import build_unsharded_model
    from megatron_patch.model import hf_mapping

    os.makedirs(directory)
    shapes = {n: tuple(p.shape) for n, p in
              build_unsharded_model(cfg, torch.bfloat16, meta=True).named_parameters()}
    plan = [(name, shape, torch.bfloat16) for item in hf_mapping.items(cfg)
            for name, shape in zip(item.hf, hf_mapping.hf_shapes(item, shapes[item.mcore], cfg))]
    writer = ShardedWriter(directory, plan, 2 * 10**9)
    generator = torch.Generator().manual_seed(0)
    for name, shape, dtype in plan:
        writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(dtype))
    writer.finish()
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(hf_config_for(cfg, "bfloat16"), handle, indent=2)
    return writer.total_bytes


def measure(command) -> dict:
    """Runs ``command``; its wall time and peak RSS (the kernel's high-water mark via wait4)."""
    started = time.time()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            log.seek(0)
            raise SystemExit(f"{command} failed:\n{log.read()[-4000:]}")
    return {"seconds": time.time() - started, "rss": usage.ru_maxrss * 1024}


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def worker(args) -> None:
    """One conversion, in its own process (what ``measure`` watches)."""
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    from megatron_patch.checkpoint_conversion import convert_hf_to_mcore, convert_mcore_to_hf
    if args.worker == "synthesize":
        print(json.dumps({"bytes": write_synthetic_checkpoint(model_config(args), args.dst)}))
    elif args.worker == "to_mcore":
        convert_hf_to_mcore(args.src, args.dst, model=model_config(args), progress=False)
    else:
        convert_mcore_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-ov-1.5-4b")
    parser.add_argument("--num-layers", type=int, default=8, help="language layers (0: the preset's)")
    parser.add_argument("--workdir", default="/tmp/bench_ckpt")
    parser.add_argument("--max-shard-size", default="1GB", help="export shard size")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--worker", choices=("synthesize", "to_mcore", "to_hf"), help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    cfg = model_config(args)
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf_dir, mcore_dir, back_dir = (os.path.join(args.workdir, n) for n in ("hf", "mcore", "hf_back"))
    base = [sys.executable, os.path.abspath(__file__), "--model", args.model,
            "--num-layers", str(args.num_layers), "--max-shard-size", args.max_shard_size]
    # every heavy step in a child process: a child's peak RSS starts at its parent's RSS at fork
    t0 = time.time()
    subprocess.run(base + ["--worker", "synthesize", "--dst", hf_dir], check=True, stdout=subprocess.DEVNULL)
    size = directory_bytes(hf_dir) - os.path.getsize(os.path.join(hf_dir, "config.json"))
    print(f"synthetic {cfg.name} checkpoint: {size / 1e9:.2f} GB bf16 in {time.time() - t0:.0f} s")
    results = {
        "HF -> mcore": measure(base + ["--worker", "to_mcore", "--src", hf_dir, "--dst", mcore_dir]),
        f"mcore -> HF ({args.max_shard_size} shards)":
            measure(base + ["--worker", "to_hf", "--src", mcore_dir, "--dst", back_dir]),
    }
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, "
          f"torch {torch.__version__}")
    print(f"checkpoint: {size / 1e9:.2f} GB (mcore dir {directory_bytes(mcore_dir) / 1e9:.2f} GB)")
    print(f"{'direction':32} {'time s':>7} {'peak RSS GB':>12} {'RSS / checkpoint':>17}")
    for name, r in results.items():
        print(f"{name:32} {r['seconds']:7.1f} {r['rss'] / 1e9:12.2f} {r['rss'] / size:17.2f}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
