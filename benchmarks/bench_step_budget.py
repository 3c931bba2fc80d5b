"""Where a GPU step's time has to go for a target MFU, from the MFU formula's own FLOPs.

The GPU benchmark's step (its synthetic packs, its model) is split into the FLOPs of the matmuls
and of attention (megatron_patch/training/flops.py: the terms MFU counts, and HFU's chunked-loss
correction), each timed at a rate: by default the rates the one H200 profile measured
(2026-12-04, docs/BENCHMARKS.md: matmul kernels 0.91 s, attention kernels 0.46 s). What is left
of the step time the target MFU allows is the budget for everything else the device runs
(norms, RoPE, SwiGLU, residual adds, copies, the loss's softmax, the optimizer), if the host
keeps up. No GPU needed: it says which kernels the target rests on before one is lent.

    python benchmarks/bench_step_budget.py                          # 50% MFU on an H100/H200
    python benchmarks/bench_step_budget.py --attention-tflops 250   # a faster attention kernel
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_patch.benchmarking.synthetic import (SyntheticPackedBatches,  # noqa: E402
                                                  SyntheticSpec)
from megatron_patch.model import get_config  # noqa: E402
from megatron_patch.training import arguments, flops  # noqa: E402
from megatron_patch.training.interval_stats import batch_flops, model_shapes  # noqa: E402

# the GPU benchmark's model (docs/BENCHMARKS.md, "GPU comparison: the command")
GPU_BENCHMARK = dict(num_layers=28, hidden_size=2048, ffn_hidden_size=6144,
                     num_attention_heads=16, num_query_groups=8, rotary_base=1e6)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llava-ov-1.5-4b")
    arguments.add_model_override_arguments(p)
    p.set_defaults(**GPU_BENCHMARK)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batches", type=int, default=8, help="per step")
    p.add_argument("--steps", type=int, default=2, help="steps of synthetic packs averaged")
    p.add_argument("--image-size-min", type=int, default=224, help="pixels, multiple of 28")
    p.add_argument("--image-size-max", type=int, default=672, help="pixels, multiple of 28")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-loss-chunks", action="store_true",
                   help="megatron's output layer over every token (--loss-chunk-tokens 0)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 (H100/H200)")
    p.add_argument("--target-mfu", type=float, default=0.5)
    p.add_argument("--matmul-tflops", type=float, default=None,
                   help="achieved matmul rate (default: the 2026-12-04 H200 profile's)")
    p.add_argument("--attention-tflops", type=float, default=None,
                   help="achieved attention rate (default: the 2026-12-04 H200 profile's)")
    return p.parse_args(argv)


# the 2026-12-04 H200 step (docs/BENCHMARKS.md): its kernel seconds, megatron's output layer
H200_2026_12_04 = dict(matmul_seconds=0.910, attention_seconds=0.464)


def step_flops(args) -> dict:
    """Model and hardware FLOPs of one step, the attention's share, and the hardware FLOPs with
    megatron's output layer (``as_profiled``: how the 2026-12-04 step ran), averaged over
    ``args.steps`` steps of the benchmark's synthetic packs."""
    cfg = get_config(args.model, arguments.model_overrides(args))
    language, vision = model_shapes(cfg)
    spec = SyntheticSpec(vocab_size=cfg.language.vocab_size, image_token_id=cfg.image_token_id,
                         seq_length=args.seq_length, patch_dim=cfg.vision.patch_dim,
                         merge_size=cfg.vision.spatial_merge_size,
                         patch_size=cfg.vision.patch_size, image_side_min=args.image_size_min,
                         image_side_max=args.image_size_max, seed=args.seed)
    totals = dict(model=0.0, hardware=0.0, attention=0.0, as_profiled=0.0)
    batches = SyntheticPackedBatches(spec).take(args.steps * args.micro_batches)
    for batch in batches:
        model, hardware = batch_flops(batch, language, vision, None,
                                      chunked_loss=not args.no_loss_chunks)
        segments = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        patches = batch.image_grid_thw.prod(dim=1).tolist()
        totals["model"] += model
        totals["hardware"] += hardware
        totals["as_profiled"] += batch_flops(batch, language, vision, None)[1]
        totals["attention"] += 3 * (flops.language_attention_flops(language, segments)
                                    + flops.vision_attention_flops(vision, patches))
    return {key: value / args.steps for key, value in totals.items()}


def measured_rates(args, per_step: dict) -> tuple:
    """(matmul, attention) FLOP/s: the command line's, else the 2026-12-04 H200 profile's kernel
    seconds for the FLOPs of an average step as it ran then (megatron's output layer, no
    recompute)."""
    matmul = (args.matmul_tflops * 1e12 if args.matmul_tflops else
              (per_step["as_profiled"] - per_step["attention"])
              / H200_2026_12_04["matmul_seconds"])
    attention = (args.attention_tflops * 1e12 if args.attention_tflops else
                 per_step["attention"] / H200_2026_12_04["attention_seconds"])
    return matmul, attention


def budget(per_step: dict, matmul_rate: float, attention_rate: float, mfu: float,
           peak: float) -> dict:
    """Seconds per step: allowed at ``mfu`` of ``peak`` FLOP/s, taken by the matmuls and the
    attention at their rates, and what is left for the rest."""
    allowed = per_step["model"] / (mfu * peak)
    matmul = (per_step["hardware"] - per_step["attention"]) / matmul_rate
    attention = per_step["attention"] / attention_rate
    return dict(allowed=allowed, matmul=matmul, attention=attention,
                rest=allowed - matmul - attention)


def main(argv=None) -> None:
    args = parse_args(argv)
    per_step = step_flops(args)
    matmul_rate, attention_rate = measured_rates(args, per_step)
    seconds = budget(per_step, matmul_rate, attention_rate, args.target_mfu,
                     args.peak_tflops * 1e12)
    loss = "megatron's output layer" if args.no_loss_chunks else "the chunked loss"
    print(f"one step ({args.micro_batches} x {args.seq_length} tokens, {loss}): model "
          f"{per_step['model'] / 1e12:.1f} TFLOP, hardware {per_step['hardware'] / 1e12:.1f} "
          f"(matmuls {(per_step['hardware'] - per_step['attention']) / 1e12:.1f}, attention "
          f"{per_step['attention'] / 1e12:.1f})")
    print(f"at {args.target_mfu:.0%} MFU of {args.peak_tflops:.0f} TFLOP/s: "
          f"{seconds['allowed']:.3f} s per step")
    print(f"  matmuls at {matmul_rate / 1e12:.0f} TFLOP/s: {seconds['matmul']:.3f} s")
    print(f"  attention at {attention_rate / 1e12:.0f} TFLOP/s: {seconds['attention']:.3f} s")
    print(f"  left for everything else: {seconds['rest']:.3f} s "
          f"({seconds['rest'] / seconds['allowed']:.0%} of the step)")


if __name__ == "__main__":
    main()
