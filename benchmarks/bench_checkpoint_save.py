"""How long a checkpoint save stops training: a synchronous save against --async-save and against
--ckpt-assume-constant-structure, and with several data-parallel ranks, the writes split over the
replicas (--ckpt-fully-parallel-save, the default) against the first replica writing everything.

Builds the objects the trainer saves (``components.wrap_model``, ``optimizer.build_optimizer``,
``build_scheduler``), steps them on synthetic packed batches and saves with
``checkpointing.save_checkpoint`` into a fresh directory per mode, with one save strategy per mode
kept for its saves as the trainer keeps one for a run. Per mode it reports:

* blocked: seconds from the start of the save until the next step can start (synchronous: the
  whole write and the publishing; async: copying the state and starting the writer), for the
  mode's first save and the median from its third save on (``--saves``: with a constant
  structure the second save skips megatron's checks, the third is the first to reuse its plan);
* published: seconds until the mode's last checkpoint is complete (async: meanwhile the loop
  trains, and polls after each step as the trainer does);
* the step time alone and while the writer runs (it competes for cores and memory bandwidth);
* the checkpoint's size.

A first, untimed save pays the one-time costs (megatron's writer processes).

    python benchmarks/bench_checkpoint_save.py --save-dir /tmp/ckpt_bench \\
        --hidden-size 1024 --ffn-hidden-size 4096 --num-layers 8
    torchrun --nproc-per-node 2 benchmarks/bench_checkpoint_save.py --save-dir /tmp/ckpt_bench

Figures depend on the disk as much as on the model: docs/BENCHMARKS.md names both.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.benchmarking.runners import MegatronRunner, trainer_namespace  # noqa: E402
from megatron_patch.benchmarking.synthetic import SyntheticPackedBatches, SyntheticSpec  # noqa: E402
from megatron_patch.model import get_config  # noqa: E402
from megatron_patch.training import arguments  # noqa: E402
from megatron_patch.training.background_saves import BackgroundSaves  # noqa: E402
from megatron_patch.training.checkpointing import (RunState, SaveStrategy,  # noqa: E402
                                                   directory_bytes, optimizer_format,
                                                   save_checkpoint)
from megatron_patch.training.optimizer import build_scheduler  # noqa: E402
from megatron_patch.training.parallel_setup import initialize, shutdown  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save-dir", required=True, help="checkpoints are written (and removed) here")
    p.add_argument("--model", default="tiny")
    arguments.add_model_override_arguments(p)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="steps timed without a save")
    p.add_argument("--saves", type=int, default=4, help="saves per mode (one strategy for them)")
    p.add_argument("--image-size-min", type=int, default=56, help="pixels, multiple of 28")
    p.add_argument("--image-size-max", type=int, default=224, help="pixels, multiple of 28")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="write the results here (rank 0)")
    args = p.parse_args(argv)
    # what trainer_namespace reads: one micro-batch of one packed sequence per rank and step
    args.warmup_steps, args.data_path, args.tokenizer_path = 1, None, None
    args.micro_batch_size = 1
    args.global_batch_size = int(os.environ.get("WORLD_SIZE", "1"))
    return args


class Loop:
    """The model, optimizer and batches, stepped the way the trainer steps them."""

    def __init__(self, args, ranks):
        self.args, self.ranks = args, ranks
        self.train_args = trainer_namespace(args, ranks.world_size)
        cfg = get_config(args.model, arguments.model_overrides(args))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.runner = MegatronRunner(self.train_args, cfg, device)
        self.scheduler = build_scheduler(self.train_args, self.runner.optimizer)
        vision = cfg.vision
        self.batches = SyntheticPackedBatches(SyntheticSpec(
            vocab_size=cfg.language.vocab_size, image_token_id=cfg.image_token_id,
            seq_length=args.seq_length, patch_dim=vision.patch_dim,
            merge_size=vision.spatial_merge_size, patch_size=vision.patch_size,
            image_side_min=args.image_size_min, image_side_max=args.image_size_max,
            seed=args.seed + ranks.dp_rank))
        self.iteration = 0

    def step(self) -> float:
        started = time.perf_counter()
        self.runner.step([next(self.batches)])
        self.iteration += 1
        return time.perf_counter() - started

    def save(self, directory: str, background=None, strategy=None) -> str:
        return save_checkpoint(
            directory, self.runner.chunks, self.runner.optimizer, self.scheduler,
            RunState(iteration=self.iteration), None, self.ranks, {},
            layout=optimizer_format(self.args.use_distributed_optimizer), strategy=strategy,
            background=background, keep_last=1)


def fresh_directory(path: str, rank: int) -> str:
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    dist.barrier()
    return path


MODES = {  # mode -> (background, SaveStrategy arguments)
    "sync": (False, {}),
    "sync-constant-structure": (False, {"assume_constant_structure": True}),
    "async": (True, {}),
    "sync-first-replica": (False, {"fully_parallel": False}),
}


def measure(loop: Loop, mode: str, saves: int, save_dir: str, keep: bool) -> dict:
    """`saves` saves in `mode` (each replaces the last: the iteration does not change between
    synchronous saves); the loop trains while an async one is written, until it is published.
    The checkpoint is removed afterwards unless `keep` (disks hold few of a large model's)."""
    directory = fresh_directory(os.path.join(save_dir, mode), loop.ranks.rank)
    in_background, strategy_args = MODES[mode]
    background = BackgroundSaves() if in_background else None
    strategy = SaveStrategy(**strategy_args)
    blocked, during = [], []
    for _ in range(saves):
        started = time.perf_counter()
        path = loop.save(directory, background, strategy)
        blocked.append(time.perf_counter() - started)
        while background is not None and background.busy:
            during.append(loop.step())
            background.poll()
        published = time.perf_counter() - started
    row = {"mode": mode, "first_blocked_s": blocked[0],
           "blocked_s": statistics.median(blocked[2:] or blocked[-1:]), "published_s": published,
           "steps_while_writing": len(during),
           "step_s_while_writing": statistics.median(during) if during else None,
           "checkpoint_bytes": directory_bytes(path)}
    if not keep:
        fresh_directory(directory, loop.ranks.rank)
    return row


def main(argv=None):
    args = parse_args(argv)
    ranks = initialize(1, 1, args.seed)
    loop = Loop(args, ranks)
    loop.step()                                                   # warm-up
    step_alone = statistics.median(loop.step() for _ in range(args.steps))
    warmup = fresh_directory(os.path.join(args.save_dir, "warmup"), ranks.rank)
    loop.save(warmup)
    fresh_directory(warmup, ranks.rank)
    modes = [mode for mode in MODES if ranks.dp_size > 1 or mode != "sync-first-replica"]
    rows = [measure(loop, mode, args.saves, args.save_dir, args.keep) for mode in modes]
    if ranks.rank == 0:
        parameters = loop.runner.parameter_count()
        print(f"model {args.model} ({parameters / 1e6:.1f} M parameters per rank), "
              f"{'bf16' if args.bf16 else 'fp32'}, "
              f"{'distributed' if args.use_distributed_optimizer else 'plain'} optimizer, "
              f"DP={ranks.dp_size}; step alone {step_alone:.2f} s")
        print(f"{'mode':<24} {'blocked s: first':>16} {'3rd on':>6} {'published s':>12} "
              f"{'steps meanwhile':>16} {'step s meanwhile':>17} {'checkpoint GiB':>15}")
        for row in rows:
            during = row["step_s_while_writing"]
            print(f"{row['mode']:<24} {row['first_blocked_s']:>16.2f} {row['blocked_s']:>6.2f} "
                  f"{row['published_s']:>12.2f} "
                  f"{row['steps_while_writing']:>16d} "
                  f"{'-' if during is None else f'{during:.2f}':>17} "
                  f"{row['checkpoint_bytes'] / 2 ** 30:>15.3f}")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(dict(args=vars(args), parameters_per_rank=parameters,
                               step_s_alone=step_alone, data_parallel=ranks.dp_size, rows=rows),
                          handle, indent=1)
        if not args.keep:
            shutil.rmtree(args.save_dir, ignore_errors=True)
    shutdown()


if __name__ == "__main__":
    main()
