"""The host's own time per micro-batch and per step of the megatron trainer, measured on the CPU.

A GPU step is host-bound when the host takes longer to issue a micro-batch's kernels than the
device takes to run them. The 2026-12-04 H200 step was (docs/BENCHMARKS.md, "GPU"), and the
kernel launches it issued have since been counted and cut 6.6x (bench_launches.py). Whether the
host's time fell with them is a different question: much of it is Python that is not a launch
(megatron's modules, the schedule, autograd's engine, DDP's hooks), and a compiled kernel's call
costs far more host time than an eager operator's (dynamo's, AOTAutograd's and inductor's
wrappers run in Python on every call, forward and backward).

So this runs the trainer's real step (megatron's DDP, schedule and mixed-precision optimizer:
benchmarking/runners.MegatronRunner) with the code paths a GPU takes switched on
(benchmarking/gpu_paths.py, and the kernels the trainer picks where CUDA is present) at the GPU
benchmark's depth, but with widths so small that the CPU's arithmetic is a small part of the
time. Packed attention is a stand-in of one allocation each way (the one kernel it is on a GPU).
What is left of the arithmetic grows with the tokens; the host's work does not (the operators
and calls are the same for any length), so the step is timed at two sequence lengths and the
time at zero tokens extrapolated: the host's time per step on this CPU, kernels' launch work
included (a CPU operator's dispatch and allocation, where a GPU's adds the driver's launch).
The launches are counted in the same process (benchmarking/launch_count.py), so the host time
per counted launch comes out too.

    python benchmarks/bench_host_time.py              # the GPU's code paths (the trainer's default)
    python benchmarks/bench_host_time.py --no-rope-fusion --no-norm-fusion \\
        --loss-chunk-tokens 0 --no-gradient-accumulation-fusion   # close to 2026-12-04's
"""
import argparse
import contextlib
import json
import os
import sys
import time
from unittest import mock

import torch
from megatron.core.optimizer import optimizer as megatron_optimizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_launches  # noqa: E402
from megatron_patch.benchmarking import launch_count, throughput  # noqa: E402
from megatron_patch.benchmarking.gpu_paths import gpu_code_paths, gpu_kernel_options  # noqa: E402
from megatron_patch.benchmarking.runners import MegatronRunner, trainer_namespace  # noqa: E402
from megatron_patch.benchmarking.synthetic import SyntheticSpec  # noqa: E402
from megatron_patch.benchmarking.system import machine_info  # noqa: E402
from megatron_patch.model import attention, get_config  # noqa: E402
from megatron_patch.training import arguments, kernels  # noqa: E402
from megatron_patch.training.parallel_setup import initialize, shutdown  # noqa: E402

# widths at which the CPU's arithmetic is a fraction of the host's work at these lengths (a
# quarter at 256 tokens, extrapolated away); what is launched does not depend on them:
# bench_launches.py counts the same operators at any width
NEGLIGIBLE_WIDTHS = dict(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         num_query_groups=2, kv_channels=16, vision_hidden_size=32,
                         vision_ffn_hidden_size=64, vision_num_attention_heads=2,
                         vocab_size=1024, image_token_id=5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=bench_launches.GPU_BENCHMARK["model"])
    arguments.add_model_override_arguments(p)
    arguments.add_kernel_arguments(p)  # the trainer's switches, with their GPU defaults here
    p.add_argument("--fp32", action="store_true", help="fp32 weights (default bf16, as on a GPU)")
    p.add_argument("--seq-lengths", type=int, nargs=2, default=(256, 512), metavar=("S1", "S2"),
                   help="the two lengths timed; the host's time is extrapolated to zero tokens")
    p.add_argument("--image-size", type=int, default=56, help="pixels per side, multiple of 28")
    p.add_argument("--micro-batches", type=int, default=8,
                   help="per optimizer step (the GPU benchmark's 8)")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps per length (the fastest counts)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch's intra-op threads (the host's work is one Python thread)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    args.bf16 = not args.fp32
    if args.model == bench_launches.GPU_BENCHMARK["model"]:
        for key, value in bench_launches.GPU_BENCHMARK.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    if args.seq_lengths[0] >= args.seq_lengths[1]:
        p.error("--seq-lengths: the second must be longer")
    return args


class _OneAllocation(torch.autograd.Function):
    """Packed attention as the host sees it on a GPU: one kernel each way. The values (zeros)
    do not matter to what the host does; the shapes do."""

    @staticmethod
    def forward(ctx, query, key, value):
        ctx.shapes = (query.shape, key.shape, value.shape)
        with launch_count.one_launch("varlen_attention_forward"):
            return query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        with launch_count.one_launch("varlen_attention_backward"):
            sizes = [shape.numel() for shape in ctx.shapes]
            flat = grad.new_zeros(sum(sizes))
        return tuple(part.view(shape) for part, shape in zip(flat.split(sizes), ctx.shapes))


def one_allocation_attention(query, key, value, *args, **kwargs):
    """torch's ``varlen_attn`` signature (what model/attention.py's fast path calls)."""
    return _OneAllocation.apply(query, key, value)


@contextlib.contextmanager
def gpu_step_paths():
    """The trainer's step as a GPU runs it, on the CPU: the GPU's code paths, the kernels the
    trainer chooses where CUDA is present (wrap_model asks training/kernels.py) and the
    one-allocation attention. (Clipping as on a GPU is :func:`gpu_clipping`'s: building a
    trainer installs the CPU's own.)"""
    choose_options, choose_wgrad = kernels.model_options, kernels.gradient_accumulation_fusion

    def options_with_cuda(args):
        with mock.patch.object(kernels, "model_options", choose_options):
            return gpu_kernel_options(args)

    def wgrad_with_cuda(args):
        with mock.patch.object(torch.cuda, "is_available", lambda: True):
            return choose_wgrad(args)

    with gpu_code_paths(), \
            mock.patch.object(attention, "packed_attention_kernel",
                              lambda name: one_allocation_attention), \
            mock.patch.object(kernels, "model_options", options_with_cuda), \
            mock.patch.object(kernels, "gradient_accumulation_fusion", wgrad_with_cuda):
        yield


def trainer_args(args, seq_length: int):
    """The trainer's namespace for the runner (its defaults, these switches and sizes)."""
    bench_args = throughput.parse_args(
        ["--model", args.model, "--seq-length", str(seq_length), "--steps", "1",
         "--grad-accum", str(args.micro_batches), "--seed", str(args.seed)]
        + ([] if args.fp32 else ["--bf16"]))
    for key in arguments.KERNEL_SWITCH_KEYS:
        setattr(bench_args, key, getattr(args, key))
    return trainer_namespace(bench_args)


def model_config(args):
    return get_config(args.model, {**arguments.model_overrides(args), **NEGLIGIBLE_WIDTHS})


def micro_batches(args, cfg, seq_length: int) -> list:
    """The benchmark's synthetic mix shrunk to this length: text lengths scaled by
    ``seq_length / 8192`` and small images, so a pack holds about as many samples and images
    (segments for the attention, images for the vision tower) at either length."""
    sizes = argparse.Namespace(seq_length=seq_length, image_size_min=args.image_size,
                               image_size_max=args.image_size, seed=args.seed)
    packs = bench_launches.synthetic_packs(
        sizes, cfg, text_length_median=SyntheticSpec.text_length_median * seq_length / 8192)
    return packs.take(args.micro_batches)


def gpu_clipping():
    """megatron's gradient clipping as on a GPU (one multi-tensor scale), in place of the CPU's
    redirect that building a trainer installs (compat/cpu.py): entered after the build."""
    return mock.patch.object(megatron_optimizer, "clip_grad_by_total_norm_fp32",
                             bench_launches.clip_as_on_a_gpu)


@contextlib.contextmanager
def timed_updates(optimizer, seconds: list):
    """Appends the seconds of each optimizer update (megatron's ``step_with_ready_grads``:
    AdamW and the copy into the bf16 weights) to ``seconds``."""
    update = optimizer.step_with_ready_grads

    def timed():
        start = time.perf_counter()
        try:
            return update()
        finally:
            seconds.append(time.perf_counter() - start)

    with mock.patch.object(optimizer, "step_with_ready_grads", timed):
        yield


def time_rounds(args, runner, rows: list) -> None:
    """Warm-up, then timed rounds; each round steps once at every length, so a slow spell of
    the machine touches them alike. Appends to each row's steps and updates."""
    for index in range(args.warmup_steps + args.steps):
        for row in rows:
            updates = []
            with timed_updates(runner.optimizer, updates):
                start = time.perf_counter()
                runner.step(row["batches"])
                seconds = time.perf_counter() - start
            if index >= args.warmup_steps:
                row["steps"].append(seconds)
                row["updates"] += updates


def measure(args, cfg) -> list:
    """For each length, the fastest step and optimizer update (:func:`time_rounds`, on one
    trainer), and one step's launches at the shorter length, counted."""
    initialize(1, 1, args.seed)
    try:
        runner = MegatronRunner(trainer_args(args, max(args.seq_lengths)), cfg,
                                torch.device("cpu"))
        rows = [dict(seq_length=seq, batches=micro_batches(args, cfg, seq), steps=[],
                     updates=[]) for seq in args.seq_lengths]
        with gpu_clipping():  # after the build, which installs the CPU's clipping
            time_rounds(args, runner, rows)
            counted, _ = launch_count.count_launches(lambda: runner.step(rows[0]["batches"]))
        kernels_used = dict(kernels.model_options(runner.args), gradient_accumulation_fusion=
                            kernels.gradient_accumulation_fusion(runner.args))
        runner.close()
    finally:
        shutdown()
    for row in rows:
        batches = row.pop("batches")
        row.update(step_seconds=min(row["steps"]), update_seconds=min(row["updates"]),
                   images=sum(batch.num_images for batch in batches),
                   samples=sum(batch.num_samples for batch in batches))
    rows[0].update(launches=sum(counted.values()), kernels=kernels_used)
    return rows


def extrapolate(short: dict, long: dict, key: str) -> float:
    """The linear fit's value at zero tokens: what does not grow with the tokens."""
    s1, s2 = short["seq_length"], long["seq_length"]
    return short[key] - (long[key] - short[key]) * s1 / (s2 - s1)


def host_time(args, lengths: list) -> dict:
    """Seconds at zero tokens: the step, its optimizer update, a micro-batch (the rest / M)."""
    step = extrapolate(*lengths, "step_seconds")
    update = extrapolate(*lengths, "update_seconds")
    return dict(step_seconds=step, update_seconds=update,
                micro_batch_seconds=(step - update) / args.micro_batches)


def report(args, cfg, lengths: list, host: dict) -> str:
    options = ", ".join(f"{key} {value}" for key, value in lengths[0]["kernels"].items()
                        if not key.startswith("recompute"))
    lines = [f"model {args.model} at negligible widths, {cfg.language.num_layers} language + "
             f"{cfg.vision.num_layers} vision layers; {'fp32' if args.fp32 else 'bf16'}; "
             f"{args.micro_batches} micro-batches per step; {args.threads} thread(s); "
             f"{machine_info(torch.device('cpu'))['cpu_model']}",
             f"kernels as on a GPU: {options}"]
    for row in lengths:
        lines.append(f"seq {row['seq_length']:>6}: step {row['step_seconds'] * 1e3:8.1f} ms "
                     f"(optimizer update {row['update_seconds'] * 1e3:.1f} ms; "
                     f"{row['samples']} samples, {row['images']} images)")
    lines.append(f"host time at zero tokens: step {host['step_seconds'] * 1e3:.1f} ms, "
                 f"per micro-batch {host['micro_batch_seconds'] * 1e3:.1f} ms, optimizer update "
                 f"{host['update_seconds'] * 1e3:.1f} ms")
    lines.append(f"launches per step (counted at seq {lengths[0]['seq_length']}): "
                 f"{lengths[0]['launches']}; host time per launch "
                 f"{host['step_seconds'] / lengths[0]['launches'] * 1e6:.1f} us")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    with gpu_step_paths():
        lengths = measure(args, cfg)
    host = host_time(args, lengths)
    print(report(args, cfg, lengths, host))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(args=vars(args), lengths=lengths, host=host), handle, indent=1)


if __name__ == "__main__":
    main()
