"""Activation memory per tensor-parallel rank: TP=1, plain TP, and TP with --sequence-parallel.

Counts the bytes autograd keeps for the backward pass (saved tensors, parameters excluded, each
storage once) during the forward of one packed micro-batch, split into the language model's
decoder layers (per layer: what grows with depth, x36 for the 4B) and everything else (vision
tower, adapter, embedding, final norm, output layer and loss). That is the memory
``--sequence-parallel`` and recompute are for, counted exactly rather than read off an
allocator, so the figures are the same on CPU and GPU for the same spec (the local spec; TE's
fused layers save somewhat different tensors) and need no GPU to compare layouts.

    torchrun --nproc-per-node 2 benchmarks/bench_activation_memory.py --seq-length 4096
    torchrun --nproc-per-node 2 benchmarks/bench_activation_memory.py --model llava-ov-1.5-4b \\
        --num-layers 2 --vision-num-layers 2 --seq-length 8192 --bf16

The tensor-parallel size is the number of processes; TP=1 runs on every rank alike.

``--gpu-paths`` counts what the GPU's code paths keep (the trainer's GPU defaults: compiled
norms, RoPE, SwiGLU and chunked loss, varlen attention; megatron_patch/benchmarking/gpu_paths.py)
in a CPU process, and ``--estimate-for-depth 28 24`` adds what a whole model of that depth holds
at the end of its forward on one GPU: weights, gradient buffer and optimizer state, plus the
layers' and the rest's activations. That is the figure to hold against a GPU's memory before
one is lent (the 88 GiB peak of 2026-12-04 did not fit an 80 GB H100):

    python benchmarks/bench_activation_memory.py --model llava-ov-1.5-4b --num-layers 1 \
        --vision-num-layers 1 --hidden-size 2048 --ffn-hidden-size 6144 --num-attention-heads 16 \
        --num-query-groups 8 --seq-length 8192 --bf16 --image-size-min 224 \
        --image-size-max 672 --gpu-paths --estimate-for-depth 28 24
"""
import argparse
import contextlib
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_patch.benchmarking.gpu_paths import gpu_code_paths, gpu_kernel_options  # noqa: E402
from megatron_patch.benchmarking.memory_peak import outside_torch  # noqa: E402
from megatron_patch.benchmarking.synthetic import SyntheticPackedBatches, SyntheticSpec  # noqa: E402
from megatron_patch.model import build_model, count_parameters, get_config  # noqa: E402
from megatron_patch.training import arguments, kernels  # noqa: E402
from megatron_patch.training.parallel_setup import initialize, shutdown  # noqa: E402
from megatron_patch.training.train_step import model_inputs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    arguments.add_model_override_arguments(p)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--bf16", action="store_true")
    arguments.add_recompute_arguments(p)
    arguments.add_kernel_arguments(p)  # the trainer's switches and defaults (CPU: none fused)
    p.add_argument("--gpu-paths", action="store_true",
                   help="count what the GPU's code paths keep (the trainer's defaults with CUDA), "
                        "in this CPU process")
    p.add_argument("--estimate-for-depth", type=int, nargs=2, metavar=("LANGUAGE", "VISION"),
                   help="also measure one more layer of each tower and estimate a model of "
                        "this many language and vision layers on one GPU (TP=1): its states plus "
                        "what its forward keeps")
    p.add_argument("--image-size-min", type=int, default=56, help="pixels, multiple of 28")
    p.add_argument("--image-size-max", type=int, default=224, help="pixels, multiple of 28")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="write the results here (rank 0)")
    p.add_argument("--top", type=int, default=0, help="also list the N largest saved tensors of "
                   "the TP=1 forward: region, shape, dtype and the source line that saved them")
    return p.parse_args(argv)


def _saving_line() -> str:
    """The innermost source line outside torch itself: which module saved the tensor."""
    frames = [f for f in traceback.extract_stack()[:-2] if outside_torch(f.filename)]
    frame = frames[-1]
    return f"{os.path.basename(frame.filename)}:{frame.lineno} {(frame.line or '').strip()}"


def saved_activation_bytes(model, inputs, top: int = 0) -> dict:
    """Bytes of the distinct storages autograd saves during one forward and still holds at its
    end (selective recompute frees the norms' outputs after saving them), parameters excluded:
    ``{"decoder_per_layer": ..., "other": ...}``, and with ``top`` the largest of them, each
    with the line that saved it (``"largest"``)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    decoder = model.language_model.decoder
    region = ["other"]
    saved, largest = {}, []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = (region[0], storage)
            if top:
                largest.append(dict(region=region[0], bytes=storage.nbytes(),
                                    shape=list(tensor.shape), dtype=str(tensor.dtype),
                                    saved_by=_saving_line()))
        return tensor

    def switch_to(name):
        return lambda *_: region.__setitem__(0, name)

    # the decoder's layers, without its final norm (one per model, not per layer)
    hooks = [decoder.register_forward_pre_hook(switch_to("decoder")),
             decoder.register_forward_hook(switch_to("other"))]
    if decoder.final_layernorm is not None:
        hooks += [decoder.final_layernorm.register_forward_pre_hook(switch_to("other")),
                  decoder.final_layernorm.register_forward_hook(switch_to("decoder"))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    totals = {"decoder": 0, "other": 0}
    for where, storage in saved.values():
        totals[where] += storage.nbytes()  # now: 0 for an output recompute discarded
    del loss
    result = {"decoder_per_layer": totals["decoder"] / len(decoder.layers),
              "other": totals["other"]}
    if top:
        result["largest"] = sorted(largest, key=lambda entry: -entry["bytes"])[:top]
    return result


def model_options(args) -> dict:
    """build_model's kernel and recompute keywords: the trainer's on this machine, or with
    ``--gpu-paths`` the trainer's on a GPU."""
    return gpu_kernel_options(args) if args.gpu_paths else kernels.model_options(args)


def measure(args, cfg, batch, tp: int, sequence_parallel: bool, device, top: int = 0) -> dict:
    initialize(tp, 1, args.seed)
    model = build_model(cfg, attention_backend="local",
                        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                        sequence_parallel=sequence_parallel, **model_options(args)).to(device)
    inputs = model_inputs(batch, device)
    inputs.pop("loss_mask")
    if args.gpu_paths:  # the compiled kernels compile outside the count
        model(**inputs).float().sum().backward()
        model.zero_grad(set_to_none=True)
    return saved_activation_bytes(model, inputs, top)


# bytes per parameter the trainer holds on its GPU (megatron's mixed-precision optimizer, the
# gradient buffer in fp32, torch's AdamW): bf16 weight, fp32 gradient, fp32 master weight and
# two fp32 moments; in fp32 the weight is its own master
STATE_BYTES_PER_PARAMETER = {True: 2 + 4 + 4 + 8, False: 4 + 4 + 8}


def _kept(row: dict, cfg) -> float:
    """All a measured forward keeps: its decoder layers' bytes and the rest."""
    return row["decoder_per_layer"] * cfg.language.num_layers + row["other"]


def full_depth_estimate(args, cfg, batch, measured: dict, device) -> dict:
    """What a model of ``--estimate-for-depth`` layers holds at the end of its forward on one
    GPU (TP=1), the moment every layer's activations are alive: its states (weights, gradient
    buffer, optimizer state, for its parameters counted on the meta device) plus what the
    measured model keeps, with each missing layer's share added. A layer's share is the
    difference to a model with one more such layer (the first language layer also keeps what
    all of them share, so the per-layer average is not it). Not in it: the backward's transients
    (a layer's gradients, a loss chunk's logits), the allocator's fragmentation and the CUDA
    context."""
    language, vision = args.estimate_for_depth
    overrides = arguments.model_overrides(args)
    kept = _kept(measured, cfg)
    per_layer = {}
    for tower, key in (("language", "num_layers"), ("vision", "vision_num_layers")):
        depth = getattr(cfg, tower).num_layers
        deeper = get_config(args.model, dict(overrides, **{key: depth + 1}))
        per_layer[tower] = _kept(measure(args, deeper, batch, 1, False, device), deeper) - kept
    initialize(1, 1, args.seed)
    with torch.device("meta"):
        full = get_config(args.model, dict(overrides, num_layers=language,
                                           vision_num_layers=vision))
        parameters = count_parameters(build_model(full, attention_backend="local",
                                                  use_cpu_initialization=True,
                                                  perform_initialization=False))["total"]
    states = parameters * STATE_BYTES_PER_PARAMETER[args.bf16]
    activations = (kept + (language - cfg.language.num_layers) * per_layer["language"]
                   + (vision - cfg.vision.num_layers) * per_layer["vision"])
    return dict(language_layers=language, vision_layers=vision, parameters=parameters,
                language_per_layer=per_layer["language"], vision_per_layer=per_layer["vision"],
                states=states, activations=activations, total=states + activations)


def format_estimate(estimate: dict) -> str:
    gib = 2 ** 30
    return (f"estimate for {estimate['language_layers']} language + {estimate['vision_layers']} "
            f"vision layers on one GPU: {estimate['parameters'] / 1e6:,.1f} M parameters, "
            f"states {estimate['states'] / gib:.2f} GiB + activations "
            f"{estimate['activations'] / gib:.2f} GiB (a language layer "
            f"{estimate['language_per_layer'] / 2 ** 20:.1f} MiB, a vision layer "
            f"{estimate['vision_per_layer'] / 2 ** 20:.1f} MiB) = {estimate['total'] / gib:.2f} "
            "GiB at the end of the forward")


def main(argv=None):
    args = parse_args(argv)
    cfg = get_config(args.model, arguments.model_overrides(args))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    initialize(1, 1, args.seed)
    world = torch.distributed.get_world_size()
    vision = cfg.vision
    batch = SyntheticPackedBatches(SyntheticSpec(
        vocab_size=cfg.language.vocab_size, image_token_id=cfg.image_token_id,
        seq_length=args.seq_length, patch_dim=vision.patch_dim, merge_size=vision.spatial_merge_size,
        patch_size=vision.patch_size, image_side_min=args.image_size_min,
        image_side_max=args.image_size_max, seed=args.seed)).take(1)[0]
    layouts = [(1, False)] + ([(world, False), (world, True)] if world > 1 else [])
    rows, estimate = [], None
    with gpu_code_paths() if args.gpu_paths else contextlib.nullcontext():
        for tp, sequence_parallel in layouts:
            saved = measure(args, cfg, batch, tp, sequence_parallel, device,
                            top=args.top if tp == 1 else 0)
            rows.append(dict(tp=tp, sequence_parallel=sequence_parallel, **saved))
        if args.estimate_for_depth:
            estimate = full_depth_estimate(args, cfg, batch, rows[0], device)
    if torch.distributed.get_rank() == 0:
        base = rows[0]["decoder_per_layer"]
        chunk = model_options(args)["loss_chunk_tokens"]
        loss = (f"loss in chunks of {chunk} tokens" if chunk
                else "megatron's output layer + cross entropy")
        paths = "the GPU's code paths" if args.gpu_paths else "this machine's code paths"
        print(f"model {args.model}, seq {args.seq_length}, {batch.num_samples} samples / "
              f"{batch.num_images} images in the pack, recompute "
              f"{kernels.recompute(args)}, {'bf16' if args.bf16 else 'fp32'}, {loss}, {paths}")
        print(f"{'layout':<12} {'MiB/rank per decoder layer':>27} {'vs TP=1':>8} "
              f"{'MiB/rank other':>15}")
        for row in rows:
            name = f"TP={row['tp']}" + (" + SP" if row["sequence_parallel"] else "")
            print(f"{name:<12} {row['decoder_per_layer'] / 2 ** 20:>27.2f} "
                  f"{row['decoder_per_layer'] / base:>8.3f} {row['other'] / 2 ** 20:>15.1f}")
        for entry in rows[0].get("largest", []):
            print(f"{entry['bytes'] / 2 ** 20:9.1f} MiB  {entry['region']:<7} "
                  f"{str(tuple(entry['shape'])):<24} {entry['dtype']:<15} {entry['saved_by']}")
        if estimate:
            print(format_estimate(estimate))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(dict(args=vars(args), samples=batch.num_samples,
                               images=batch.num_images, rows=rows, estimate=estimate),
                          handle, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
