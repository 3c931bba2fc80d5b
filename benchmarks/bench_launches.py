"""GPU kernel launches per micro-batch and per step of the megatron trainer, counted on the CPU.

The 2026-12-04 H200 step was host-bound (~60 us of host time per launched kernel, the GPU idle
for more than half the step: docs/BENCHMARKS.md), so launches per micro-batch decide the step
time there, and every change that removes some is worth knowing before a GPU is lent. This
counts them from the operators the trainer runs (megatron_patch/benchmarking/launch_count.py),
with the code paths a GPU takes switched on where the CPU can run them: the compiled
query/key/value preparation, RoPE, norms, SwiGLU, bias-GELU, bias-dropout-add and chunked-loss
kernels (torch.compile's CPU build), the optimizer's multi-tensor kernels, and packed
attention as the one varlen kernel call it is on a GPU (a stand-in that computes it on the CPU
and counts one launch each way). Weight gradients are counted as with gradient-accumulation
fusion: a GEMM, no separate add; DDP's hook adds the other parameters' gradients
(compat/ddp_grad_adds.py: the small ones together).

Per-layer counts are differences: the model is built three times, with one more language layer,
then one more vision layer, than the base, so nothing has to be attributed to a layer by guess.
The total for the full depth is the rest (embedding, merge, adapter, loss, ...) plus the layers;
the optimizer step is counted once, on the full-depth model.

    python benchmarks/bench_launches.py                       # the GPU benchmark's model
    python benchmarks/bench_launches.py --no-gpu-paths        # what the CPU runs instead
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections import Counter
from unittest import mock

import torch
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as megatron_optimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.benchmarking import launch_count, throughput  # noqa: E402
from megatron_patch.benchmarking.gpu_paths import gpu_code_paths, gpu_kernel_options  # noqa: E402
from megatron_patch.benchmarking.runners import MegatronRunner, trainer_namespace  # noqa: E402
from megatron_patch.benchmarking.synthetic import (SyntheticPackedBatches,  # noqa: E402
                                                  SyntheticSpec)
from megatron_patch.compat import ddp_grad_adds  # noqa: E402
from megatron_patch.model import build_model, get_config  # noqa: E402
from megatron_patch.training import arguments, kernels  # noqa: E402
from megatron_patch.training.parallel_setup import initialize, shutdown  # noqa: E402
from megatron_patch.training.train_step import guarded_optimizer_step, model_inputs  # noqa: E402

# the GPU benchmark's model (docs/BENCHMARKS.md, "GPU comparison: the command"); widths only
# change how long this takes, not what is launched, so they are small by default
GPU_BENCHMARK = dict(model="llava-ov-1.5-4b", num_layers=28, num_attention_heads=16,
                     num_query_groups=8, rotary_base=1e6)
SMALL_WIDTHS = dict(hidden_size=128, ffn_hidden_size=384, vision_hidden_size=64,
                    vision_ffn_hidden_size=256, vision_num_attention_heads=2, vocab_size=4096,
                    image_token_id=5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=GPU_BENCHMARK["model"])
    arguments.add_model_override_arguments(p)
    p.add_argument("--full-widths", action="store_true",
                   help="keep the preset's widths and vocabulary (slow on a CPU; same counts)")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--fp32", action="store_true", help="fp32 weights (default bf16, as on a GPU)")
    p.add_argument("--no-gpu-paths", action="store_true",
                   help="count what the CPU runs: no compiled kernels, the per-segment attention")
    p.add_argument("--padding-guard", action="store_true",
                   help="packed attention with its padding guard, as before the trainer's "
                        "segments were checked to cover every row (the 2026-12-04 GPU run)")
    arguments.add_kernel_arguments(p)  # the trainer's switches, with their GPU defaults here
    arguments.add_recompute_arguments(p)
    p.add_argument("--image-size-min", type=int, default=224, help="pixels, multiple of 28")
    p.add_argument("--image-size-max", type=int, default=672, help="pixels, multiple of 28")
    p.add_argument("--pack", type=int, default=2, help="which synthetic pack to count (0-based)")
    p.add_argument("--micro-batches", type=int, default=8,
                   help="per optimizer step, for the step's total (the GPU benchmark's 8)")
    p.add_argument("--top", type=int, default=12, help="operators listed per part")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="also write the counts here")
    args = p.parse_args(argv)
    args.bf16 = not args.fp32  # the name training/kernels.py reads
    if args.model == GPU_BENCHMARK["model"]:
        for key, value in GPU_BENCHMARK.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    return args


def clip_as_on_a_gpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's gradient clipping as it runs on a GPU (one multi-tensor scale of every
    gradient; the CPU's redirect, compat/cpu.py, multiplies them one by one)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        clip_grads.multi_tensor_scale_impl(2048, None, [grads, grads], coeff)


def build_options(args) -> dict:
    """build_model's kernel keywords as the trainer chooses them on a GPU. ``--no-gpu-paths``
    turns the compiled kernels off (the loss stays as chosen for a GPU, computed eagerly)."""
    options = gpu_kernel_options(args)
    if args.no_gpu_paths:
        options.update(fused_kernels=False, rope_fusion=False, norm_fusion=False)
        if args.cross_entropy_loss_fusion is None:
            options["cross_entropy_loss_fusion"] = False
    return options


def unfused_gradients(model, fused: bool) -> list:
    """Parameters whose gradient DDP's hook adds into the buffer: with gradient-accumulation
    fusion all but megatron's linear layers' weights (norms, biases, embeddings, ...), without
    it all."""
    fused_weights = {id(module.weight) for module in model.modules() if fused
                     and isinstance(module, (ColumnParallelLinear, RowParallelLinear))}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in fused_weights]


def count_buffer_adds(model, fused: bool) -> Counter:
    """DDP's hook adding the gradients no GEMM accumulated (:func:`unfused_gradients`) into the
    fp32 buffer, as in a backward pass (compat/ddp_grad_adds.py: large ones one add each, small
    ones kept and added together at the backward's end), named apart from the model's own."""
    pairs = [(torch.zeros(p.shape, dtype=torch.float32), p.grad)
             for p in unfused_gradients(model, fused)]

    def hook_adds():
        with mock.patch.object(ddp_grad_adds, "_backward_task", lambda: 1), \
                mock.patch.object(ddp_grad_adds, "_at_backward_end", lambda callback: None):
            for main_grad, grad in pairs:
                ddp_grad_adds.add_to_buffer(main_grad, grad)
        ddp_grad_adds.add_pending()

    counted, _ = launch_count.count_launches(hook_adds)
    return Counter({f"{name} (DDP hook)": n for name, n in counted.items()})


def count_micro_batch(args, cfg, batch, device) -> dict:
    """Launches of one micro-batch's forward and backward (after one untimed pass that compiles)."""
    initialize(1, 1, args.seed)
    model = build_model(cfg, attention_backend="local",
                        params_dtype=torch.float32 if args.fp32 else torch.bfloat16,
                        **build_options(args)).to(device)
    inputs = model_inputs(batch, device)
    loss_mask = inputs["loss_mask"]
    if args.padding_guard and inputs["packed_seq_params"] is not None:
        params = inputs["packed_seq_params"]
        inputs["packed_seq_params"] = PackedSeqParams(**{
            field.name: getattr(params, field.name) for field in dataclasses.fields(params)})

    def forward():
        return (model(**inputs).float() * loss_mask.to(device).float()).sum()

    forward().backward()  # compiles
    # no gradient yet: each gradient is its kernel's output, no separate add. DDP's hook then
    # adds into the fp32 buffer what no GEMM accumulated (counted apart)
    model.zero_grad(set_to_none=True)
    fwd, loss = launch_count.count_launches(forward)
    bwd, _ = launch_count.count_launches(loss.backward)
    bwd.update(count_buffer_adds(model, fused=args.gradient_accumulation_fusion is not False))
    shutdown()
    return dict(forward=fwd, backward=bwd)


def count_optimizer_step(args, cfg, device) -> dict:
    """Launches of the trainer's optimizer step (megatron's mixed-precision optimizer: gradient
    norm, clipping, AdamW on the fp32 master weights, their copy into the bf16 weights), after a
    first step that allocates AdamW's state. With the GPU's code paths AdamW is torch's fused
    kernel (compat/fused_adam.py), as the trainer chooses on a GPU; the gradients are random
    (their values launch nothing different)."""
    bench_args = throughput.parse_args(["--model", args.model, "--steps", "1"]
                                       + ([] if args.fp32 else ["--bf16"]))
    train_args = trainer_namespace(bench_args)
    initialize(1, 1, args.seed)
    runner = MegatronRunner(train_args, cfg, device)
    torch.manual_seed(args.seed)
    for parameter in runner.model.module.parameters():
        parameter.main_grad.normal_()
    guarded_optimizer_step(runner.optimizer, bench_args.clip_grad)  # allocates AdamW's state
    # set here: building the runner installs the CPU's redirect (compat/cpu.py) in its place
    clipping = (contextlib.nullcontext() if args.no_gpu_paths else mock.patch.object(
        megatron_optimizer, "clip_grad_by_total_norm_fp32", clip_as_on_a_gpu))
    with clipping:
        counted, _ = launch_count.count_launches(
            lambda: guarded_optimizer_step(runner.optimizer, bench_args.clip_grad))
    runner.close()
    shutdown()
    return dict(step=counted)


def _difference(more: dict, base: dict) -> dict:
    return {phase: more[phase] - base[phase] for phase in base}


def parts(args, batch, device) -> dict:
    """{part: {"forward": Counter, "backward": Counter}} for one language layer, one vision
    layer and the rest, and the model's layer counts."""
    overrides = arguments.model_overrides(args)
    full = get_config(args.model, overrides)
    depth = dict(language=full.language.num_layers, vision=full.vision.num_layers)
    if not args.full_widths:
        overrides.update(SMALL_WIDTHS)
    shallow = dict(num_layers=2, vision_num_layers=2)
    counts = {}
    for name, extra in (("base", {}), ("language", dict(num_layers=3)),
                        ("vision", dict(vision_num_layers=3))):
        cfg = get_config(args.model, {**overrides, **shallow, **extra})
        counts[name] = count_micro_batch(args, cfg, batch, device)
    language = _difference(counts["language"], counts["base"])
    vision = _difference(counts["vision"], counts["base"])
    rest = {phase: counts["base"][phase] - language[phase] - language[phase]
            - vision[phase] - vision[phase] for phase in counts["base"]}
    cfg = get_config(args.model, {**overrides, "num_layers": depth["language"],
                                  "vision_num_layers": depth["vision"]})
    optimizer = count_optimizer_step(args, cfg, device)
    return dict(parts={"language layer": language, "vision layer": vision, "rest": rest},
                depth=depth, optimizer=optimizer)


def synthetic_packs(args, cfg, **spec) -> SyntheticPackedBatches:
    """The benchmark's synthetic packs for this model and the command line's sizes; ``spec``:
    more of SyntheticSpec's fields (the text lengths, ...)."""
    vcfg = cfg.vision
    return SyntheticPackedBatches(SyntheticSpec(
        vocab_size=cfg.language.vocab_size, image_token_id=cfg.image_token_id,
        seq_length=args.seq_length, patch_dim=vcfg.patch_dim,
        merge_size=vcfg.spatial_merge_size, patch_size=vcfg.patch_size,
        image_side_min=args.image_size_min, image_side_max=args.image_size_max, seed=args.seed,
        **spec))


def synthetic_pack(args, cfg):
    return synthetic_packs(args, cfg).take(args.pack + 1)[args.pack]


def report(args, result: dict, batch) -> str:
    depth, rows = result["depth"], result["parts"]
    total = {phase: sum(rows["language layer"][phase].values()) * depth["language"]
             + sum(rows["vision layer"][phase].values()) * depth["vision"]
             + sum(rows["rest"][phase].values()) for phase in ("forward", "backward")}
    paths = "the CPU's code paths" if args.no_gpu_paths else "the GPU's code paths"
    layers = f"{depth['language']} language + {depth['vision']} vision layers"
    lines = [f"model {args.model} ({layers}), "
             f"seq {args.seq_length}, pack {args.pack}: {batch.num_samples} samples, "
             f"{batch.num_images} images; {'fp32' if args.fp32 else 'bf16'}, {paths}, "
             f"recompute {kernels.recompute(args)}",
             "kernels: " + ", ".join(f"{key} {value}" for key, value in build_options(args).items()
                                     if not key.startswith("recompute"))
             + f", gradient-accumulation fusion {args.gradient_accumulation_fusion is not False}"
             + f", padding guard {args.padding_guard}",
             f"{'part':<16} {'forward':>8} {'backward':>9} {'x count':>8} {'per micro-batch':>16}"]
    for name, count in (("language layer", depth["language"]), ("vision layer", depth["vision"]),
                        ("rest", 1)):
        fwd, bwd = (sum(rows[name][phase].values()) for phase in ("forward", "backward"))
        lines.append(f"{name:<16} {fwd:>8} {bwd:>9} {count:>8} {(fwd + bwd) * count:>16}")
    per_micro_batch = total["forward"] + total["backward"]
    lines.append(f"{'micro-batch':<16} {total['forward']:>8} {total['backward']:>9} {'':>8} "
                 f"{per_micro_batch:>16}")
    optimizer = sum(result["optimizer"]["step"].values())
    lines.append(f"optimizer step: {optimizer}; a step of {args.micro_batches} micro-batches: "
                 f"{per_micro_batch * args.micro_batches + optimizer}")
    listed = [(name, phase, rows[name][phase])
              for name in rows for phase in ("forward", "backward")]
    for name, phase, counter in listed + [("optimizer", "step", result["optimizer"]["step"])]:
        top = ", ".join(f"{op.replace('aten::', '')} {n}"
                        for op, n in counter.most_common(args.top) if n)
        lines.append(f"  {name} {phase}: {top}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    overrides = arguments.model_overrides(args)
    if not args.full_widths:
        overrides.update(SMALL_WIDTHS)
    batch = synthetic_pack(args, get_config(args.model, overrides))
    paths = contextlib.nullcontext() if args.no_gpu_paths else gpu_code_paths()
    with paths:
        result = parts(args, batch, device)
    print(report(args, result, batch))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(args=vars(args), depth=result["depth"],
                           parts={name: {phase: dict(counter) for phase, counter in row.items()}
                                  for name, row in result["parts"].items()},
                           optimizer_step=dict(result["optimizer"]["step"])), handle, indent=1)


if __name__ == "__main__":
    main()
