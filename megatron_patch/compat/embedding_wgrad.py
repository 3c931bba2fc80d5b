"""Gradient-accumulation fusion for the token embedding: its weight gradient goes into the fp32
``main_grad`` row by row, never as a whole table.

Why: torch's embedding backward writes a gradient the size of the whole table
(``[151936, 2048]`` in bf16 for Qwen's vocabulary: 622 MB, almost all of it zeros, for the at
most 8,192 rows a micro-batch of seq 8192 touches), and megatron DDP's hook then adds all of it
into the fp32 buffer (reading 0.6 GB, reading and writing 2.5 GB). That is ~3.7 GB of memory
traffic per micro-batch, ~1 ms on an H100, ~0.5% of the GPU benchmark's step, for rows the
lookup already names.

How: inside :func:`rows_into_main_grad`, megatron's ``VocabParallelEmbedding`` looks its rows
up through :class:`_LookupIntoMainGrad`. A ``TorchFunctionMode`` catches its ``F.embedding``
call on that weight only; the rest of megatron's forward (the vocabulary-shard masking under
TP, the reductions) runs as it is. The backward adds the incoming ``[tokens, h]`` rows into
``main_grad`` with ``index_put_(accumulate=True)``, which sorts the indices first (deterministic
on CUDA, unlike ``index_add_``), and returns megatron's placeholder gradient with
``grad_added_to_main_grad`` set, as megatron's linears do under ``gradient_accumulation_fusion``,
so DDP's hook skips the weight. Without a ``main_grad`` (no DDP wrapper) or a backward to come,
and under megatron's deterministic mode (an indexing lookup, not ``F.embedding``), the lookup
is torch's.

Arithmetic: each token's row is added into the fp32 buffer in fp32. torch's backward summed a
row's repeats and rounded the table to the weight dtype before DDP's add, so with bf16 weights
the buffers agree to that rounding, not bit for bit; the linears' fusion drops the same
rounding. So it is used where that fusion is (``gradient_accumulation_fusion``, by default with
CUDA), and the CPU's default keeps torch's arithmetic.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from megatron_patch.compat import wgrad_accumulation


class _LookupIntoMainGrad(torch.autograd.Function):
    """torch's lookup forward; backward: the incoming rows added into ``weight.main_grad`` at
    their ids, megatron's placeholder returned as the weight's gradient."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids, weight)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        ids, weight = ctx.saved_tensors
        main_grad = weight.main_grad
        rows = grad_output.reshape(-1, grad_output.shape[-1]).to(main_grad.dtype)
        main_grad.index_put_((ids.reshape(-1),), rows, accumulate=True)
        return None, wgrad_accumulation.placeholder_weight_gradient(weight)


def _plain(padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
           sparse=False) -> bool:
    """Whether ``F.embedding``'s options (which torch passes on with their defaults) ask for a
    plain lookup, the only kind megatron makes."""
    return padding_idx is None and max_norm is None and not scale_grad_by_freq and not sparse


class _RouteLookup(TorchFunctionMode):
    """Sends ``F.embedding(ids, weight)`` on this one weight through the fused lookup."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is F.embedding and len(args) == 2 and args[1] is self.weight
                and _plain(**kwargs)):
            return _LookupIntoMainGrad.apply(*args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def rows_into_main_grad(weight: torch.nn.Parameter, enabled: bool = True) -> Iterator[None]:
    """Within this context, an embedding lookup on ``weight`` adds its gradient into
    ``weight.main_grad`` (megatron DDP's buffer), where ``enabled`` and there is one."""
    if not (enabled and torch.is_grad_enabled() and weight.requires_grad
            and hasattr(weight, "main_grad") and hasattr(weight, "grad_added_to_main_grad")):
        yield
        return
    with _RouteLookup(weight):
        yield


__all__ = ["rows_into_main_grad"]
