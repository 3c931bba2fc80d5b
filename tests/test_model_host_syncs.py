"""A training micro-batch makes the host wait for the device nowhere.

On a GPU every value read back (a count, a mask's size, ``.item()``, ``.tolist()``), and every
blocking copy from the host (torch's default ``.to(device)`` synchronizes the stream), makes the
host wait until the device has run everything queued before it; the device then idles while the
host launches the next kernels: a stall per micro-batch that no profile of the kernels shows
(model/host_tensors.py). Meta tensors have shapes and no values, so any read raises on them.
This runs the tiny model's forward and backward on meta tensors with the code paths a GPU takes
(benchmarking/gpu_paths.py), the host-side inputs where the trainer keeps them (image grid,
segment offsets, loss mask: model_inputs), and records every blocking copy from the host, so a
sync anywhere in the vision tower, the image merge, the language model or the chunked loss
fails the test.

What it cannot run on meta tensors: torch.compile's code generation (the compiled kernels run
eagerly here; they cannot read values either), megatron's import-time compiled SwiGLU and
bias-dropout-add (their unfused forms run: ``fused_kernels`` off), and the varlen attention
kernel (a stand-in of the same shapes)."""
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_patch.benchmarking.gpu_paths import gpu_code_paths
from megatron_patch.compat import bias_gelu, packed_rope
from megatron_patch.model import attention, norms, output_loss, qkv_fusion, residual_norm

from trainer_runs import load_benchmark

# the compiled kernels' cached factories: emptied before and after, so that the eager functions
# made here (torch.compile replaced) are not what later tests get from them
COMPILED = (norms.compiled, packed_rope.fused_rotation, qkv_fusion.compiled_preparation,
            output_loss._compiled, bias_gelu.compiled_bias_gelu, residual_norm.compiled)


def shaped_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
    """The varlen kernel's output shape, from all three inputs (so the backward reaches them)."""
    return query + (key + value).repeat_interleave(query.shape[1] // key.shape[1], dim=1)


class BlockingCopies(TorchDispatchMode):
    """Records every copy from a host tensor to another device that is not ``non_blocking``:
    torch's default ``.to(device)``, which on a GPU synchronizes the stream (the host waits for
    everything queued) before it copies."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            source, target = args[0].device, kwargs.get("device", args[0].device)
        elif func is torch.ops.aten.copy_.default:
            source, target = args[1].device, args[0].device
        else:
            return func(*args, **kwargs)
        blocking = not (kwargs.get("non_blocking") or args[2:3] == (True,))
        if source.type == "cpu" and target.type != "cpu" and blocking:
            self.found.append(f"{func} of {tuple(args[0].shape)}")
        return func(*args, **kwargs)


def test_a_training_micro_batch_never_waits_for_the_device():
    from megatron_patch.training.parallel_setup import initialize, shutdown
    from megatron_patch.training.train_step import model_inputs
    bench = load_benchmark("bench_launches")
    args = bench.parse_args(["--model", "tiny", "--seq-length", "1024", "--image-size-min", "56",
                             "--image-size-max", "112", "--pack", "1", "--full-widths"])
    cfg = bench.get_config(args.model, bench.arguments.model_overrides(args))
    pack = bench.synthetic_pack(args, cfg)
    assert pack.num_images == 2 and pack.num_samples == 2  # images and segments to pick
    meta = torch.device("meta")
    for factory in COMPILED:
        factory.cache_clear()
    try:
        with gpu_code_paths(), mock.patch.object(torch, "compile", lambda fn=None, **_: fn), \
                mock.patch.object(attention, "packed_attention_kernel",
                                  lambda name: shaped_attention):
            initialize(1, 1, args.seed)
            with meta:
                model = bench.build_model(
                    cfg, attention_backend="local", use_cpu_initialization=True,
                    perform_initialization=False, params_dtype=torch.bfloat16,
                    **dict(bench.build_options(args), fused_kernels=False))
            for module in model.modules():  # made on the host by megatron's CPU init
                if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                    module.inv_freq = module.inv_freq.to(meta)
            with BlockingCopies() as copies:
                inputs = model_inputs(pack, meta)
                per_token_loss = model(**inputs)
                loss_mask = inputs["loss_mask"].to(meta, non_blocking=True)  # as forward_step
                (per_token_loss.float() * loss_mask).sum().backward()
            assert inputs["image_grid_thw"].device.type == "cpu"  # the trainer keeps it there
            assert per_token_loss.shape == pack.tokens.shape and per_token_loss.is_meta
            assert copies.found == []
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert len(grads) > 0.9 * len(list(model.parameters()))
            assert all(grad.is_meta for grad in grads)
    finally:
        shutdown()
        for factory in COMPILED:
            factory.cache_clear()
