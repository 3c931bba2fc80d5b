"""Training throughput of the megatron trainer and of a plain-PyTorch baseline, in one run.

    python tools/benchmark_throughput.py --model tiny --seq-length 1024 --steps 5 --trainer both

Each trainer runs ``--warmup-steps`` untimed then ``--steps`` timed optimizer steps of
``--grad-accum`` micro-batches (or ``--global-batch-size / --micro-batch-size``) on the same
batches: synthetic packed micro-batches (:mod:`megatron_patch.benchmarking.synthetic`, the task
encoder's format, long-tailed lengths, ``--images-per-sample`` images each) or, with
``--data-path``, a converted dataset through the trainer's own loader (``SFTTaskEncoder`` with
packing; each trainer gets a fresh loader with the same seed, hence the same batches).

Figures (timed steps only; a step is data fetch + forward/backward + optimizer, the device
synchronised at both ends):

* tokens/s = real (non-padding) tokens / time, per device; samples/s likewise (conversations).
* step time = mean wall time of a timed step.
* data wait = time spent fetching the step's micro-batches / step time (0..1).
* MFU = model FLOPs / time / peak FLOP/s; HFU = hardware FLOPs / time / peak.
  FLOPs per micro-batch come from :mod:`megatron_patch.training.flops` via
  ``interval_stats.batch_flops`` -- the trainer's own accounting: 2 FLOPs per multiply-add of
  every matmul of the vision tower (per image, its class token included, attention over the whole
  image), the adapter and the language model (attention causal within each packed segment,
  padding segment included, logits layer included); training = 3 x forward (backward = 2 x
  forward). Model FLOPs use 3x; hardware FLOPs count what runs: the decoder layers' forward
  again under full recompute (by megatron's block method the first N of each stage; the
  baseline's torch.utils.checkpoint without each layer's last matmul), the MLPs' forward
  again under selective recompute of "mlp" (its other modules are not counted), no input
  gradient for the pixels, and megatron's chunked loss as it runs: the output layer over the
  loss tokens only. Peak: ``--peak-tflops``, else the dense bf16 table in flops.py for the
  CUDA device name; unknown (CPU) -> MFU/HFU "n/a".
* peak memory: ``torch.cuda.max_memory_allocated`` on GPU (reset before each trainer is built);
  on CPU the process's resident-set high-water mark (VmHWM, reset through
  ``/proc/self/clear_refs`` before each trainer where the kernel allows it, else ru_maxrss which
  includes the earlier trainer).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from megatron_patch.benchmarking.memory_peak import record_step
from megatron_patch.benchmarking.profiling import profile_step
from megatron_patch.benchmarking.runners import (MegatronRunner, baseline_runner, load_baseline,
                                                 trainer_namespace)
from megatron_patch.benchmarking.synthetic import SyntheticPackedBatches, SyntheticSpec
from megatron_patch.benchmarking.system import (machine_info, peak_memory_gib, reset_peak_memory,
                                                sync as _sync)
from megatron_patch.model import build_model, count_parameters, get_config
from megatron_patch.training import kernels
from megatron_patch.training.arguments import (add_kernel_arguments,
                                               add_model_override_arguments,
                                               add_recompute_arguments, model_overrides)
from megatron_patch.training.flops import peak_flops_per_device
from megatron_patch.training.interval_stats import batch_flops, model_shapes

logger = logging.getLogger("megatron_patch.benchmark")

FORMULA = {
    "tokens_per_s_per_device": "real (non-padding) tokens of the timed steps / their wall time / devices",
    "model_flops": "3 x forward FLOPs of vision tower + adapter + language model "
                   "(megatron_patch/training/flops.py, interval_stats.batch_flops)",
    "hardware_flops": "model FLOPs less the patch embedding's input gradient, + the decoder "
                      "layers' forward again under full recompute (those it recomputes: "
                      "kernels.recomputed_layers; the MLPs' under selective "
                      "recompute of mlp); with the chunked loss the output layer counts 3 x "
                      "forward of the loss tokens instead of every token's "
                      "(flops.training_flops)",
    "mfu": "model_flops / time / devices / peak_flops",
    "hfu": "hardware_flops / time / devices / peak_flops",
    "data_wait_fraction": "time fetching the micro-batches of a step / step time",
}
TRAINERS = {"megatron": ("megatron",), "baseline": ("baseline",), "both": ("megatron", "baseline")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="tiny, llava-ov-1.5-4b, llava-ov-1.5-8b")
    add_model_override_arguments(g)
    g.add_argument("--attention-backend", choices=("auto", "te", "sdpa"), default="auto")
    add_recompute_arguments(g)
    g.add_argument("--bf16", action="store_true", help="megatron: bf16 params + fp32 master "
                   "weights; baseline: bf16 autocast over fp32 weights")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    add_kernel_arguments(p.add_argument_group("megatron kernels (default: the trainer's)"))
    g = p.add_argument_group("batch and steps")
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument("--micro-batch-size", type=int, default=1)
    accumulate = g.add_mutually_exclusive_group()
    accumulate.add_argument("--global-batch-size", type=int)
    accumulate.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--warmup-steps", type=int, default=2)
    g.add_argument("--steps", type=int, default=5)
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--trainer", choices=sorted(TRAINERS), default="megatron")
    g = p.add_argument_group("data (synthetic unless --data-path)")
    g.add_argument("--data-path", help="a converted dataset (tools/stage2_sftdata2webdataset.py)")
    g.add_argument("--tokenizer-path", help="with --data-path: the model's tokenizer dir")
    g.add_argument("--num-workers", type=int, default=2, help="with --data-path")
    g.add_argument("--no-packing", dest="packing", action="store_false",
                   help="with --data-path: one sample per row (synthetic data is always packed)")
    g.add_argument("--max-images-per-pack", type=int, default=32)
    g.add_argument("--max-samples-per-pack", type=int, metavar="N",
                   help="the trainer's option (default: no limit; 63 with --cuda-graph-impl local)")
    g.add_argument("--images-per-sample", type=int, default=1)
    g.add_argument("--image-size-min", type=int, default=224, help="pixels, multiple of 28")
    g.add_argument("--image-size-max", type=int, default=672, help="pixels, multiple of 28")
    g.add_argument("--text-length-median", type=float, default=550.0,
                   help="lognormal text tokens per sample (median)")
    g.add_argument("--text-length-sigma", type=float, default=0.9)
    g = p.add_argument_group("output")
    g.add_argument("--peak-tflops", type=float, help="device peak (dense bf16) for MFU/HFU")
    g.add_argument("--json", help="write the results here")
    g.add_argument("--profile-dir", help="after the timed steps, profile one more (untimed) "
                   "step of each trainer: device busy time, kernel time by category, top "
                   "kernels in DIR/<trainer>_profile.txt")
    g.add_argument("--memory-dir", help="after the timed (and profiled) steps, record one more "
                   "step's CUDA allocations: what is alive at its memory peak, by source line, in "
                   "DIR/<trainer>_memory_peak.txt, and the snapshot for pytorch.org/memory_viz "
                   "in DIR/<trainer>_memory.pickle (GPU only)")
    g.add_argument("--dry-run", action="store_true", help="parse, build both models on the meta "
                   "device, count parameters and FLOPs of one synthetic batch, then exit")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.grad_accum is not None:
        args.global_batch_size = args.grad_accum * args.micro_batch_size
    if args.steps < 1 or args.warmup_steps < 0:
        parser.error("need --steps >= 1 and --warmup-steps >= 0")
    if args.data_path is None and args.micro_batch_size != 1:
        parser.error("synthetic data is packed: use --micro-batch-size 1 (raise --seq-length)")
    if args.data_path and not args.tokenizer_path:
        parser.error("--data-path needs --tokenizer-path")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        parser.error("the benchmark measures one device: run it without torchrun")
    return args


# ---------------------------------------------------------------------- measuring
def measure(runner, batches, warmup: int, steps: int, num_micro: int, device: torch.device,
            flops_of: Callable, peak_flops: Optional[float],
            profile_dir: Optional[str] = None, memory_dir: Optional[str] = None) -> tuple:
    """Runs warmup + timed steps (and, with ``profile_dir``, one profiled step after them; with
    ``memory_dir``, one step with its allocations recorded);
    returns (figures of the timed steps, sample keys per timed or warm-up step).
    ``flops_of(batch)``: (model, hardware) FLOPs of a micro-batch as this trainer runs it."""
    totals = dict.fromkeys(("tokens", "capacity", "samples", "images", "model_flops",
                            "hardware_flops", "wait", "time"), 0.0)
    step_times, losses, keys = [], [], []
    for index in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        micro = [next(batches) for _ in range(num_micro)]
        fetched = time.perf_counter()
        pair = runner.step(micro)
        _sync(device)
        elapsed = time.perf_counter() - started
        losses.append(float(pair[0] / max(float(pair[1]), 1.0)))
        keys.append([key for batch in micro for key in batch.__key__])
        logger.info("%s step %d/%d: %.3f s%s", runner.name, index + 1, warmup + steps, elapsed,
                    " (warm-up)" if index < warmup else "")
        if index < warmup:
            continue
        step_times.append(elapsed)
        totals["wait"] += fetched - started
        totals["time"] += elapsed
        for batch in micro:
            model_flops, hardware_flops = flops_of(batch)
            totals["model_flops"] += model_flops
            totals["hardware_flops"] += hardware_flops
            totals["tokens"] += batch.real_tokens
            totals["capacity"] += batch.capacity
            totals["samples"] += batch.num_samples
            totals["images"] += batch.num_images
    seconds = max(totals["time"], 1e-9)
    result = {
        "tokens_per_s_per_device": totals["tokens"] / seconds,
        "samples_per_s_per_device": totals["samples"] / seconds,
        "step_time_s": statistics.mean(step_times),
        "step_time_s_min": min(step_times), "step_time_s_max": max(step_times),
        "data_wait_fraction": totals["wait"] / seconds,
        "model_tflops_per_s_per_device": totals["model_flops"] / seconds / 1e12,
        "hardware_tflops_per_s_per_device": totals["hardware_flops"] / seconds / 1e12,
        "mfu": totals["model_flops"] / seconds / peak_flops if peak_flops else None,
        "hfu": totals["hardware_flops"] / seconds / peak_flops if peak_flops else None,
        "tokens_per_step": totals["tokens"] / steps,
        "packing_efficiency": totals["tokens"] / max(totals["capacity"], 1.0),
        "samples_per_step": totals["samples"] / steps,
        "images_per_step": totals["images"] / steps,
        "model_flops_per_step": totals["model_flops"] / steps,
        "losses": losses,
        "step_times_s": step_times,
    }
    if profile_dir:
        micro = [next(batches) for _ in range(num_micro)]
        result["profile"] = profile_step(lambda: runner.step(micro), device, runner.name,
                                         profile_dir)
        if "kernels" in result["profile"]:  # the figure launch-count changes move
            result["profile"]["kernels_per_micro_batch"] = result["profile"]["kernels"] / num_micro
    if memory_dir:
        micro = [next(batches) for _ in range(num_micro)]
        result["memory"] = record_step(lambda: runner.step(micro), device, runner.name,
                                       memory_dir)
    return result, keys


class _Synthetic:
    """The same pre-generated micro-batches, replayed for each trainer. Pinned on a GPU node,
    as the trainer's energon loader pins its batches: a copy from pageable memory would make
    the host wait for the device at every micro-batch's inputs."""

    def __init__(self, spec: SyntheticSpec, count: int):
        started = time.perf_counter()
        source = SyntheticPackedBatches(spec)
        self.batches = source.take(count)
        if torch.cuda.is_available():
            self.batches = [batch.pin_memory() for batch in self.batches]
        self.seconds = time.perf_counter() - started
        self.dropped_overlong = source.dropped_overlong

    def open(self):
        return iter(self.batches), lambda: None


def synthetic_spec(args, cfg, train_args) -> SyntheticSpec:
    """The synthetic packs, planned under the trainer's limits (``train_args``: validated, with
    --max-samples-per-pack completed)."""
    vision = cfg.vision
    return SyntheticSpec(
        vocab_size=cfg.language.vocab_size, image_token_id=cfg.image_token_id,
        seq_length=args.seq_length, patch_dim=vision.patch_dim, merge_size=vision.spatial_merge_size,
        patch_size=vision.patch_size, images_per_sample=args.images_per_sample,
        image_side_min=args.image_size_min, image_side_max=args.image_size_max,
        text_length_median=args.text_length_median, text_length_sigma=args.text_length_sigma,
        max_images_per_pack=args.max_images_per_pack,
        max_samples_per_pack=train_args.max_samples_per_pack, seed=args.seed)


def _real_data(args, train_args):
    """(config, opener) for --data-path; ``opener()`` gives a fresh loader's (iterator, closer),
    each with the same seed, so every trainer reads the same batches."""
    from megatron_patch.data.sft_loader import build_train_loader, check_manifest, close_loader
    from megatron_patch.data.sft_task_encoder import SFTTaskEncoder
    from megatron_patch.data.tokenizer import SFTTokenizer
    from megatron_patch.training.components import encoder_settings, model_config

    check_manifest(args.data_path)
    tokenizer = SFTTokenizer(args.tokenizer_path)
    cfg = model_config(train_args, tokenizer)
    encoder = SFTTaskEncoder(tokenizer, encoder_settings(train_args))

    def opener():
        loader = build_train_loader(args.data_path, encoder, train_args.micro_batch_size,
                                    0, 1, args.num_workers, args.seed,
                                    train_args.shuffle_buffer_size)
        return iter(loader), lambda: close_loader(loader)

    return cfg, opener


def dry_run(args, cfg, train_args) -> Dict:
    """Both models on the meta device (no memory), parameter counts, FLOPs of one batch."""
    from megatron_patch.training.parallel_setup import initialize, shutdown

    initialize(1, 1, args.seed)
    try:
        with torch.device("meta"):
            model = build_model(cfg, attention_backend="local", use_cpu_initialization=True,
                                perform_initialization=False)
            ours = count_parameters(model)
            baseline = load_baseline().BaselineLlava(cfg)
            theirs = load_baseline().count_parameters(baseline)
    finally:
        shutdown()
    batch = SyntheticPackedBatches(synthetic_spec(args, cfg, train_args)).take(1)[0]
    flops = batch_flops(batch, *model_shapes(cfg), kernels.recomputed_flops(train_args),
                        recomputed_layers=kernels.recomputed_layers(train_args, cfg))
    return {"parameters": {"megatron": ours, "baseline": theirs},
            "one_micro_batch": {"real_tokens": batch.real_tokens, "samples": batch.num_samples,
                                "images": batch.num_images, "model_flops": flops[0],
                                "hardware_flops": flops[1]},
            "num_microbatches": train_args.num_microbatches}


def run(args) -> Dict:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    train_args = trainer_namespace(args)
    num_micro = train_args.num_microbatches
    extra_steps = bool(args.profile_dir) + bool(args.memory_dir)
    needed = (args.warmup_steps + args.steps + extra_steps) * num_micro
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "machine": machine_info(device), "settings": vars(args), "formula": FORMULA}
    if args.data_path is None:
        cfg = get_config(args.model, model_overrides(args))
    else:
        cfg, open_batches = _real_data(args, train_args)
    report["model"] = cfg.to_dict()
    if args.dry_run:
        report["dry_run"] = dry_run(args, cfg, train_args)
        return report
    if args.data_path is None:
        synthetic = _Synthetic(synthetic_spec(args, cfg, train_args), needed)
        open_batches = synthetic.open
        report["data"] = {"source": "synthetic", "generation_s": synthetic.seconds,
                          "micro_batches": needed, "dropped_overlong": synthetic.dropped_overlong}
    else:
        report["data"] = {"source": args.data_path, "num_workers": args.num_workers,
                          "packing": args.packing}

    from megatron_patch.training.parallel_setup import initialize, shutdown
    initialize(1, 1, args.seed, cuda_graphs=kernels.cuda_graph_segments(train_args) is not None)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_per_device(
        torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    report["peak_tflops"] = peak / 1e12 if peak else None
    shapes = model_shapes(cfg)
    results, batch_keys = {}, {}
    report["results"] = results
    try:
        for name in TRAINERS[args.trainer]:
            try:
                results[name], batch_keys[name] = _measure_trainer(
                    name, args, train_args, cfg, device, open_batches, shapes, peak)
            except Exception as error:  # noqa: BLE001 - one trainer running out of memory must
                # not lose the other's figures
                logger.exception("%s failed", name)
                results[name] = {"error": f"{type(error).__name__}: {error}"}
            if args.json:  # written after each trainer: a run killed later keeps this one
                write_json(args.json, report)
    finally:
        shutdown()
    if batch_keys.keys() == {"megatron", "baseline"}:  # both measured
        report["same_batches"] = batch_keys["megatron"] == batch_keys["baseline"]
        report["ratio_tokens_per_s"] = (results["megatron"]["tokens_per_s_per_device"]
                                        / results["baseline"]["tokens_per_s_per_device"])
    return report


def recompute_as_run(trainer: str, recompute: Optional[str]) -> Optional[str]:
    """What ``trainer``'s backward repeats (flops.training_flops) when the megatron trainer's
    would repeat ``recompute``: the baseline recomputes whole layers (full) or nothing, through
    torch.utils.checkpoint, which leaves out each layer's last matmul."""
    if trainer == "megatron":
        return recompute
    return "full_early_stop" if recompute == "full" else None


def _measure_trainer(name: str, args, train_args, cfg, device, open_batches, shapes, peak):
    """Builds one trainer on a clean device, measures it, frees it: (result, batch keys)."""
    from megatron_patch.training.parallel_setup import seed_everything
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory_kind = reset_peak_memory(device)
    seed_everything(args.seed, cuda_graphs=kernels.cuda_graph_segments(train_args) is not None)
    runner = (MegatronRunner(train_args, cfg, device) if name == "megatron"
              else baseline_runner(train_args, cfg, device))
    # the baseline computes every token's logits; megatron's chunked loss the loss tokens' only
    chunked_loss = name == "megatron" and kernels.loss_chunk_tokens(train_args) > 0
    recompute = recompute_as_run(name, kernels.recomputed_flops(train_args))
    # the baseline recomputes every layer; megatron's block method only some
    layers = kernels.recomputed_layers(train_args, cfg) if name == "megatron" else None

    def flops_of(batch):
        return batch_flops(batch, *shapes, recompute, chunked_loss, layers)

    try:
        parameters = runner.parameter_count()
        logger.info("%s: %d parameters; %d warm-up + %d timed steps of %d micro-batches",
                    name, parameters, args.warmup_steps, args.steps, train_args.num_microbatches)
        batches, close_batches = open_batches()
        try:
            result, keys = measure(runner, batches, args.warmup_steps, args.steps,
                                   train_args.num_microbatches, device, flops_of, peak,
                                   args.profile_dir, args.memory_dir)
        finally:
            close_batches()  # no idle loader workers competing with the next trainer
        result["parameters"] = parameters
        result["peak_memory_gib"] = peak_memory_gib(device)
        result["peak_memory_kind"] = memory_kind
        if name == "megatron":
            result["skipped_steps"] = runner.skipped_steps
            result["kernels"] = kernels.summary(train_args)
        return result, keys
    finally:
        runner.close()


def write_json(path: str, report: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1, default=str)


# ---------------------------------------------------------------------- output
def _fmt(value, spec: str = ".3g", percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else format(value, spec)


def format_report(report: Dict) -> str:
    if "dry_run" in report:
        return json.dumps(report["dry_run"], indent=1)
    lines = [f"device: {report['machine'].get('device_name', report['machine']['cpu_model'])} "
             f"({report['machine']['device']}), peak {_fmt(report['peak_tflops'])} TFLOP/s"]
    header = ("trainer", "tokens/s/dev", "samples/s", "step s", "TFLOP/s", "MFU", "HFU",
              "peak GiB", "data wait", "loss first->last")
    lines.append(" | ".join(header))
    measured = {name: r for name, r in report["results"].items() if "error" not in r}
    for name, r in report["results"].items():
        if name not in measured:
            lines.append(f"{name} | failed: {r['error']}")
            continue
        lines.append(" | ".join([
            name, _fmt(r["tokens_per_s_per_device"], ",.0f"), _fmt(r["samples_per_s_per_device"], ".2f"),
            _fmt(r["step_time_s"], ".3f"), _fmt(r["model_tflops_per_s_per_device"], ".3g"),
            _fmt(r["mfu"], percent=True), _fmt(r["hfu"], percent=True),
            _fmt(r["peak_memory_gib"], ".2f"), _fmt(r["data_wait_fraction"], percent=True),
            f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}"]))
    if "ratio_tokens_per_s" in report:
        lines.append(f"megatron / baseline tokens/s: {report['ratio_tokens_per_s']:.2f}x "
                     f"(same batches: {report['same_batches']})")
    for name, r in measured.items():
        if "profile" in r:
            lines.append(f"{name} profile: {_profile_line(r['profile'])}")
        if "memory" in r:
            lines.append(f"{name} memory: {_memory_line(r['memory'])}")
    if "megatron" in measured:
        used = measured["megatron"]["kernels"]
        lines.append("megatron kernels: " + "; ".join(f"{key} {value}" for key, value in used.items()))
    if not measured:
        return "\n".join(lines)
    first = next(iter(measured.values()))
    lines.append(f"per step: {first['tokens_per_step']:.0f} tokens, {first['samples_per_step']:.1f} "
                 f"samples, {first['images_per_step']:.1f} images, packing efficiency "
                 f"{100 * first['packing_efficiency']:.1f}%")
    return "\n".join(lines)


def _profile_line(profile: Dict) -> str:
    if "device_busy_s" not in profile:
        return f"step {profile['wall_s']:.3f} s (CPU: operators in {profile['table']})"
    categories = ", ".join(f"{name} {seconds:.3f}"
                           for name, seconds in profile["kernel_seconds_by_category"].items())
    busy = 100 * profile["device_busy_fraction"]
    syncs = (f"; {profile['host_syncs']} host syncs" if "host_syncs" in profile else "")
    return (f"step {profile['wall_s']:.3f} s, device busy {busy:.1f}%, "
            f"{profile['kernels_per_micro_batch']:.0f} kernels per micro-batch; "
            f"kernel s: {categories}{syncs}")


def _memory_line(memory: Dict) -> str:
    if "skipped" in memory:
        return f"not recorded ({memory['skipped']})"
    top = memory["top_sites"][0] if memory["top_sites"] else None
    largest = (f"; largest site {top['bytes'] / 2 ** 30:.2f} GiB at {top['site']}" if top
               else "")
    return (f"{memory['peak_gib']:.2f} GiB alive at the peak, {memory['before_step_gib']:.2f} "
            f"of them from before the step{largest} ({memory['table']})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-parameter listings
    args = parse_args(argv)
    report = run(args)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 1 if any("error" in r for r in report.get("results", {}).values()) else 0


__all__ = ["FORMULA", "build_parser", "format_report", "main", "measure", "parse_args", "run"]
