"""DDP's gradient-buffer adds as one multi-tensor add per backward instead of one per parameter.

megatron-core 0.16's ``DistributedDataParallel`` adds each parameter's gradient into its fp32
buffer from a hook on the parameter's gradient accumulator, ``param.main_grad.add_(param.grad)``:
one kernel per parameter and micro-batch. Gradient-accumulation fusion spares the linear layers'
weights (their GEMM adds), which leaves the norms' weights, the biases and the embeddings: 315
adds per micro-batch for the GPU benchmark's model, 14% of its kernel launches
(benchmarks/bench_launches.py), on a step the host's launches bound (docs/BENCHMARKS.md).

Here the hook keeps each small gradient (up to :data:`SMALL_GRADIENT_ELEMENTS`: norms and biases,
which cost nothing to hold) and adds them all at once with ``torch._foreach_add_``: when the
backward pass ends (a callback on autograd's engine), before any bucket's gradient reduction
starts (with ``overlap_grad_reduce`` megatron starts it from the hook that brings the bucket's
last gradient) and before the buffers are zeroed. Large gradients (the embeddings) are added
at once, as megatron does. Every element gets the same fp32 add from the same value, so the
sums are megatron's bit for bit and this runs on the CPU too (the demo's trajectory is
unchanged).
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import List, Tuple

import torch
from megatron.core.distributed import distributed_data_parallel, param_and_grad_buffer

# gradients of at most this many elements wait for the end of the backward (the benchmark
# model's norms and biases have <= 6144; its embeddings 311 M are added at once)
SMALL_GRADIENT_ELEMENTS = 1 << 20

_pending: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (main_grad, gradient to add)
_pending_task = -1  # the backward pass (autograd graph task) whose end adds them
_APPLIED = False
# megatron's own hook factory (the tests compare against it)
MEGATRON_HOOK = distributed_data_parallel.DistributedDataParallel._make_backward_post_hook


def add_pending() -> None:
    """Add every kept gradient into its buffer: per buffer dtype and device, the gradients
    converted in one piece if their dtype differs (bf16 into fp32), then one multi-tensor add."""
    if not _pending:
        return
    groups = defaultdict(list)
    for target, grad in _pending:
        groups[(target.device, target.dtype)].append((target, grad))
    _pending.clear()
    for (_, dtype), pairs in groups.items():
        targets, grads = [target for target, _ in pairs], [grad for _, grad in pairs]
        if any(grad.dtype != dtype for grad in grads):
            flat = torch.cat([grad.reshape(-1) for grad in grads]).to(dtype)
            pieces = flat.split([grad.numel() for grad in grads])
            grads = [piece.view_as(target) for piece, target in zip(pieces, targets)]
        torch._foreach_add_(targets, grads)


def _backward_task() -> int:
    """The running backward pass (autograd's graph task id); -1 outside one."""
    return torch._C._current_graph_task_id()


def _at_backward_end(callback) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def add_to_buffer(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    """``main_grad += grad``, for a small gradient inside a backward pass kept for
    :func:`add_pending` at its end."""
    global _pending_task
    task = _backward_task()
    if grad.numel() > SMALL_GRADIENT_ELEMENTS or task == -1:
        main_grad.add_(grad)
        return
    if task != _pending_task:
        add_pending()  # left by a backward that raised: megatron would have added them
        _at_backward_end(add_pending)
        _pending_task = task
    _pending.append((main_grad, grad))


def backward_post_hook(ddp, param: torch.nn.Parameter):
    """megatron 0.16's ``DistributedDataParallel._make_backward_post_hook``, its add kept for
    later by :func:`add_to_buffer`."""

    def hook(*unused):
        if distributed_data_parallel.is_graph_capturing():
            return
        if param in ddp.param_to_bucket_group:
            assert param.requires_grad
            if ddp.ddp_config.overlap_grad_reduce:
                assert param.grad is not None, \
                    "param.grad being None is not safe when overlap_grad_reduce is True"
            if param.grad is not None and (not param.grad_added_to_main_grad
                                           or getattr(param, "zero_out_wgrad", False)):
                add_to_buffer(param.main_grad, param.grad.data)
            param.grad = None
            if ddp.ddp_config.overlap_grad_reduce:
                ddp.param_to_bucket_group[param].register_grad_ready(param, ddp.force_all_reduce)

    return hook


def _adds_first(method):
    """``method`` (reading or zeroing the gradient buffers) after the kept adds."""
    @functools.wraps(method)
    def with_every_gradient_added(self, *args, **kwargs):
        add_pending()
        return method(self, *args, **kwargs)

    return with_every_gradient_added


def apply() -> None:
    """Install the batched adds in megatron's DDP (once; before a DDP wrapper is built)."""
    global _APPLIED
    if _APPLIED:
        return
    ddp = distributed_data_parallel.DistributedDataParallel
    ddp._make_backward_post_hook = backward_post_hook
    ddp.zero_grad_buffer = _adds_first(ddp.zero_grad_buffer)  # never zero before adding
    group = param_and_grad_buffer._ParamAndGradBucketGroup
    group.start_grad_sync = _adds_first(group.start_grad_sync)
    _APPLIED = True
