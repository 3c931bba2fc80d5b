"""Packed attention alone: the per-segment SDPA loop, torch's varlen flash kernel, the same kernel
as the language layers' CUDA graphs call it, and torch's cuDNN attention over the same segments.

What the local (non-TE) spec's ``SDPACoreAttention`` does for one packed sequence, forward and
backward, with the language model's head layout (Qwen3-1.7B-sized: 16 query heads, 8 KV groups,
head_dim 128) on a typical pack planned from the long-tailed SFT length mix
(``synthetic.long_tailed_lengths`` through ``plan_packs``, as the packing benchmark). Prints
milliseconds per layer for each path, the loop-to-varlen ratio and each path's largest output
difference from the loop. The paths:

* ``loop``: one SDPA call per segment (CPU, fp32, old torch);
* ``varlen``: torch's varlen flash kernel on the segments as packed (the trainer's default);
* ``varlen_fixed_segments``: the same with the segments padded to 64 and ``max_seqlen`` raised
  to the sequence length (``attention.with_fixed_segments``, what ``--cuda-graph-impl local``
  needs): the price of the graphs' fixed shapes;
* ``cudnn``: torch's cuDNN attention over the same ``cu_seqlens`` (what SDPA runs for nested
  jagged tensors; ``--packed-attention-kernel cudnn``), a candidate faster kernel on Hopper.

Each time also comes as TFLOP/s: the MFU formula's attention FLOPs (3 x forward,
training/flops.py) over the segments as the kernel computes them. ``--variants`` then times the
varlen and cuDNN kernels on the same segments with other layouts: not causal, without grouped
KV heads, and the vision tower's (16 heads of 64, not causal). On the one H200 profile
(2026-12-04) the language layers' attention ran at ~100 TFLOP/s and the vision tower's at
~350; the variants say which difference costs what.

    python benchmarks/bench_packed_attention.py                 # CUDA, bf16
    python benchmarks/bench_packed_attention.py --variants      # and the other layouts
    python benchmarks/bench_packed_attention.py --device cpu --dtype float32 --seq-length 1024

The kernels need CUDA and bf16/fp16; elsewhere only the loop is timed. A kernel that fails is
reported with its error instead of a time.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_patch.benchmarking.synthetic import long_tailed_lengths  # noqa: E402
from megatron_patch.data.packing import plan_packs  # noqa: E402
from megatron_patch.model import attention  # noqa: E402
from megatron_patch.training.flops import attention_forward_flops  # noqa: E402


def one_pack(seq_length: int, seed: int) -> list:
    """Segment lengths of a typical pack (the median number of samples) planned from 256
    long-tailed samples, plus trailing padding as a segment of its own (as the collator lays it
    out). At seq 8192 that is 8 samples; the packs range from 1 to 45."""
    lengths = long_tailed_lengths(256, seed=seed, capacity=seq_length)
    packs = sorted(plan_packs(lengths, [1] * len(lengths), seq_length, max_images=64), key=len)
    segments = [lengths[i] for i in packs[len(packs) // 2]]
    padding = seq_length - sum(segments)
    return segments + ([padding] if padding else [])


def timed(step, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `step()` after two warm-up calls."""
    for _ in range(2):
        step()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            step()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--variants", action="store_true",
                   help="also time the kernels with the other layouts (see above)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args(argv)


def variants(args) -> dict:
    """The other layouts ``--variants`` times, by name: the command line's (the language
    model's) without its causal mask, without grouped KV heads, and the vision tower's."""
    language = dict(heads=args.heads, groups=args.groups, head_dim=args.head_dim, causal=True)
    return {"not causal": {**language, "causal": False},
            "no grouped KV heads": {**language, "groups": args.heads},
            "vision layout": dict(heads=16, groups=16, head_dim=64, causal=False)}


def time_layout(args, segments, params, heads: int, groups: int, head_dim: int, causal: bool,
                with_loop: bool) -> tuple:
    """Milliseconds and TFLOP/s of each path, forward + backward, for one head layout; and
    the paths' outputs (to compare them)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim,
                               num_attention_heads=heads, num_query_groups=groups,
                               kv_channels=head_dim, attention_dropout=0.0)
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    module = attention.SDPACoreAttention(config, layer_number=1, attn_mask_type=mask,
                                         attention_type="self")
    generator = torch.Generator(device).manual_seed(args.seed)
    q = torch.randn(args.seq_length, heads, head_dim, device=device, dtype=dtype,
                    generator=generator).requires_grad_()
    k, v = (torch.randn(args.seq_length, groups, head_dim, device=device, dtype=dtype,
                        generator=generator).requires_grad_() for _ in range(2))
    grad_out = torch.randn(args.seq_length, heads * head_dim, device=device, dtype=dtype,
                           generator=generator)

    def through_module(kernel, packed):
        def forward():
            module.flash_varlen_enabled = kernel is not None
            module.config.packed_attention_kernel = kernel or "flash"
            return module(q, k, v, None, packed_seq_params=packed)
        return forward

    paths = {"loop": through_module(None, params)} if with_loop else {}
    kernels_apply = module.flash_varlen_applies(q)
    if kernels_apply and attention.flash_varlen_kernel() is not None:
        paths["varlen"] = through_module("flash", params)
        if with_loop:
            fixed = attention.with_fixed_segments(params, 64, args.seq_length)
            paths["varlen_fixed_segments"] = through_module("flash", fixed)
    if kernels_apply:
        paths["cudnn"] = through_module("cudnn", params)
    training_flops = 3 * attention_forward_flops(segments, heads * head_dim, causal)
    results, outputs = {"failed": {}}, {}
    for name, forward in paths.items():
        def step(forward=forward):
            out = forward()
            out.backward(grad_out)
            return out.detach()
        try:
            outputs[name] = step()
            results[f"{name}_ms"] = timed(step, device, args.repeats)
            results[f"{name}_tflops"] = training_flops / results[f"{name}_ms"] / 1e9
        except Exception as error:  # noqa: BLE001 - a kernel this torch lacks: say so, go on
            results["failed"][name] = f"{type(error).__name__}: {str(error)[:300]}"
    return results, outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    segments = one_pack(args.seq_length, args.seed)
    cu_host = torch.tensor([0] + segments, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    # segments that cover every row, as the trainer's packs do (no padding guard)
    params = attention.covering_packed_seq_params(cu_host, args.seq_length, max(segments), device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": args.dtype, "seq_length": args.seq_length, "segments": len(segments),
               "segment_lengths": segments, "heads": args.heads, "groups": args.groups,
               "head_dim": args.head_dim, "varlen_ms": None}
    timings, outputs = time_layout(args, segments, params, args.heads, args.groups,
                                   args.head_dim, causal=True, with_loop=True)
    results.update(timings)
    for name in outputs.keys() - {"loop"}:
        results[f"{name}_max_abs_difference"] = float(
            (outputs[name].float() - outputs["loop"].float()).abs().max())
    if results["varlen_ms"]:
        results["speedup"] = results["loop_ms"] / results["varlen_ms"]
    if args.variants:
        results["variants"] = {}
        for name, layout in variants(args).items():
            timings, _ = time_layout(args, segments, params, with_loop=False, **layout)
            results["variants"][name] = {**layout, **timings}
    print(json.dumps(results, indent=1))
    for layout, timings in {"language": results, **results.get("variants", {})}.items():
        for path in ("loop", "varlen", "varlen_fixed_segments", "cudnn"):
            if timings.get(f"{path}_ms"):
                print(f"attention {layout:<20} {path:<22} {timings[f'{path}_ms']:8.3f} ms "
                      f"{timings[f'{path}_tflops']:7.1f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
