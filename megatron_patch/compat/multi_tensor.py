"""torch's ``_foreach`` kernels for megatron's multi-tensor fallbacks on a GPU without TE/APEX.

Without Transformer Engine or APEX, megatron-core 0.16's optimizer falls back to
``megatron.core.utils.local_multi_tensor_l2_norm`` and ``local_multi_tensor_scale``, which work
one tensor at a time. Once per optimizer step, over every gradient (~600 tensors for the
LLaVA-OV model):

* the gradient norm launches one norm per tensor, then builds a host tensor from the list of
  device scalars: one host sync per gradient (``torch.tensor(list of CUDA tensors)``), and one
  more for ``float(...)``;
* clipping scales every gradient with a multiply and a copy per tensor, and the mixed-precision
  optimizer copies its fp32 master weights into the model weights the same way: for bf16
  weights (``_multi_tensor_copy_this_to_that`` without an overflow buffer) always, one
  ``copy_`` per parameter whatever kernels are installed.

torch's ``_foreach_norm`` / ``_foreach_mul_`` / ``_foreach_copy_`` do the same work in a few
multi-tensor launches and no sync. (The bf16 copy was found by counting the optimizer step's
launches, benchmarks/bench_launches.py: 526 per step for the benchmark model.) They are used
for CUDA tensors only: on the CPU the fallbacks stay megatron's own, bit for bit (the demo's
trajectory depends on its rounding, as compat/packed_rope.py explains), and with TE or APEX
megatron's fused kernels are untouched.
"""
from __future__ import annotations

import importlib

import torch

_APPLIED = False


def _on_gpu(tensors) -> bool:
    return bool(tensors) and tensors[0].is_cuda


def l2_norm(original):
    """``multi_tensor_l2norm``'s contract (no per-tensor norms): ``([norm of all], None)``."""

    def multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        (tensors,) = tensor_lists
        if not _on_gpu(tensors):
            return original(chunk_size, noop_flag, tensor_lists, per_tensor, *args)
        norms = torch.stack(torch._foreach_norm(tensors)).float()
        return torch.linalg.vector_norm(norms).reshape(1), None

    return multi_tensor_l2_norm


def scale(original):
    """``multi_tensor_scale``'s contract: ``dst[i] = src[i] * scale`` (in place when the lists
    are the same tensors: clipping; a plain copy, with dtype conversion, at scale 1.0: master
    weights into model weights)."""

    def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, factor):
        sources, targets = tensor_lists
        if not _on_gpu(sources):
            return original(chunk_size, noop_flag, tensor_lists, factor)
        if all(source is target for source, target in zip(sources, targets)):
            torch._foreach_mul_(targets, factor)
        elif factor == 1.0:
            torch._foreach_copy_(targets, sources)
        else:  # not used by megatron 0.16; a temporary list the size of the sources
            torch._foreach_copy_(targets, torch._foreach_mul(sources, factor))

    return multi_tensor_scale


def copy_this_to_that(original):
    """megatron's ``_multi_tensor_copy_this_to_that(this, that, overflow_buf)``: ``that[i] =
    this[i]``, which for bf16 (no overflow buffer) loops over the tensors."""

    def _multi_tensor_copy_this_to_that(this, that, overflow_buf=None):
        if overflow_buf is not None or not _on_gpu(this):
            return original(this, that, overflow_buf)
        torch._foreach_copy_(that, this)

    return _multi_tensor_copy_this_to_that


def apply() -> None:
    """Replace the fallbacks where megatron chose them (once)."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core import utils
    for module_name, attribute, wrapper, fallback in (
            ("megatron.core.optimizer.clip_grads", "l2_norm_impl", l2_norm,
             utils.local_multi_tensor_l2_norm),
            ("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl", scale,
             utils.local_multi_tensor_scale),
            ("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl", scale,
             utils.local_multi_tensor_scale)):
        module = importlib.import_module(module_name)
        if getattr(module, attribute, None) is fallback:
            setattr(module, attribute, wrapper(fallback))
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer._multi_tensor_copy_this_to_that = copy_this_to_that(
        optimizer._multi_tensor_copy_this_to_that)
    _APPLIED = True


__all__ = ["apply", "l2_norm", "scale"]
