"""Gradient-accumulation fusion without APEX: each weight gradient's GEMM adds straight into the
fp32 ``main_grad`` buffer.

megatron's own linears (``tensor_parallel.layers``: every linear of the local spec, the output
layer in every spec) fuse gradient accumulation with APEX's ``fused_weight_gradient_mlp_cuda``
and refuse ``gradient_accumulation_fusion`` without it. Unfused, every weight's gradient takes
three steps per micro-batch: a bf16 GEMM into a new tensor, then megatron DDP's hook adds that
tensor into the fp32 ``main_grad``. That is one more kernel per weight and micro-batch (4,208 of
the 68,569 launches of a host-bound step in the first GPU profile, docs/BENCHMARKS.md), a bf16
temporary the size of the weight, and a bf16 rounding of each micro-batch's gradient before the
fp32 sum.

torch (>= 2.8) has the fused GEMM on CUDA: ``addmm`` with bf16/fp16 operands and an fp32 result
(``out_dtype``), accumulating into its output. This module provides APEX's two functions on
it, with APEX's signatures, and :func:`install` hands them to megatron where APEX is missing:

* ``wgrad_gemm_accum_fp32(input, grad_output, main_grad)``: ``main_grad += grad_output^T input``
  for an fp32 ``main_grad`` (megatron's ``grad_reduce_in_fp32``, what the trainer uses);
* ``wgrad_gemm_accum_fp16(...)``: the same for a ``main_grad`` in the operands' dtype.

Where no mixed-dtype GEMM runs (the CPU, older torch), bf16 operands take the unfused arithmetic
instead -- a GEMM in bf16, then the add -- so the result equals the unfused path bit for bit.
Whether the device has the fused GEMM, and whether it accumulates in place correctly when its
output is its addend, is checked once per device and dtype on small integer matrices, whose
products are exact.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import torch


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """megatron passes [tokens, features]; a 3-D activation is flattened the same way."""
    return tensor.reshape(-1, tensor.shape[-1])


@functools.lru_cache(maxsize=None)
def fp32_output_gemm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=float32, out=c)`` computes ``c + a @ b`` here
    for ``dtype`` operands (CUDA with torch >= 2.8 for bf16/fp16; never the CPU's build)."""
    return device.type == "cuda" and accumulates_in_place(device, dtype)


def accumulates_in_place(device: torch.device, dtype: torch.dtype) -> bool:
    """The check itself, on integer matrices whose products are exact in any dtype."""
    a = torch.arange(12, device=device).reshape(3, 4).to(dtype)
    b = torch.arange(20, device=device).reshape(4, 5).to(dtype)
    accumulator = torch.ones(3, 5, device=device)
    expected = accumulator + a.float() @ b.float()
    try:
        torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return torch.equal(accumulator, expected)


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """APEX's contract: ``main_grad`` (fp32, [out, in]) += ``grad_output``^T ``input``."""
    input, grad_output = _as_matrix(input), _as_matrix(grad_output)
    if input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), input)
    elif fp32_output_gemm_works(main_grad.device, input.dtype):
        torch.addmm(main_grad, grad_output.t(), input, out_dtype=torch.float32, out=main_grad)
    else:
        main_grad.add_(torch.mm(grad_output.t(), input))


def wgrad_gemm_accum_fp16(input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """APEX's contract for a half-precision ``main_grad`` (the operands' dtype)."""
    main_grad.addmm_(_as_matrix(grad_output).t(), _as_matrix(input))


def placeholder_weight_gradient(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """What megatron's linears return for a weight whose gradient went into ``main_grad``: a
    placeholder that keeps DDP's hook on the main thread (or None without DDP's marker), with
    the marker set so that the hook does not add it."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.main_grad.shape, dtype=weight.dtype, device=weight.device)


def install() -> None:
    """Give megatron's linears these functions where APEX's kernel is missing (idempotent).

    Nothing changes until a model is built with ``gradient_accumulation_fusion=True``: megatron
    only reads the module inside such linears' backward."""
    from megatron.core.tensor_parallel import layers
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = sys.modules[__name__]
        layers._grad_accum_fusion_available = True


def uses_apex() -> bool:
    """Whether megatron's linears have APEX's kernel rather than this module's."""
    from megatron.core.tensor_parallel import layers
    kernel = getattr(layers, "fused_weight_gradient_mlp_cuda", None)
    return layers._grad_accum_fusion_available and kernel is not sys.modules[__name__]


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel a fused run's weight gradients take on ``device`` with ``dtype`` weights, for
    the run's kernel summary: a throughput figure needs to say whether the fusion saved work."""
    if uses_apex():
        return "APEX fused_weight_gradient_mlp_cuda"
    if dtype == torch.float32:
        return "torch addmm into the fp32 buffer"
    if fp32_output_gemm_works(device, dtype):
        return "torch addmm with fp32 output into the fp32 buffer"
    return f"{dtype} GEMM, then an add (no fp32-output GEMM on {device.type}: unfused arithmetic)"


__all__ = ["accumulates_in_place", "describe", "fp32_output_gemm_works", "install",
           "placeholder_weight_gradient", "uses_apex", "wgrad_gemm_accum_fp16",
           "wgrad_gemm_accum_fp32"]
