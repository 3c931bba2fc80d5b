"""The GPU's code paths, switched on in a CPU process, for benchmarks that count what a GPU step
does without a GPU: the kernels it launches (benchmarks/bench_launches.py) and the activations
it keeps for the backward (benchmarks/bench_activation_memory.py).

Each module that picks a GPU-only path asks a small predicate (``_on_gpu``, ``kernels``'
``torch.cuda.is_available``); :func:`gpu_code_paths` makes those say yes. The compiled
query/key/value preparation, RoPE, norms (with the residual add before each), SwiGLU,
bias-GELU, bias-dropout-add and chunked-loss kernels then run through torch.compile's CPU build,
which keeps the same tensors for the backward and launches one graph as on a GPU, and AdamW
through torch's fused kernel (CPU build). Packed attention, whose varlen kernel has no CPU
build, is a stand-in that computes it segment by segment, keeps what the kernel keeps and counts
one launch each way.
"""
import contextlib
from unittest import mock

import torch
import torch.nn.functional as F

from megatron_patch.benchmarking import launch_count
from megatron_patch.compat import bias_gelu, fused_adam, multi_tensor, packed_rope
from megatron_patch.model import (attention, norms, output_loss, qkv_fusion, residual_norm,
                                  vision)
from megatron_patch.training import kernels


class _VarlenStandIn(torch.autograd.Function):
    """Packed attention as the GPU runs it: one kernel forward, one backward, and the tensors
    torch's varlen kernel saves (query, key, value, the segments, the output and the fp32
    log-sum-exp per head and token). The forward's values are real (segment by segment on the
    CPU); the backward's are zeros, which launch the same kernels downstream."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seq_q, causal: bool, scale):
        with launch_count.one_launch("varlen_attention_forward"):
            out = query.new_empty(query.shape[0], query.shape[1], value.shape[-1])
            log_sum_exp = query.new_empty(query.shape[1], query.shape[0], dtype=torch.float32)
            bounds = cu_seq_q.tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
                out[start:end] = F.scaled_dot_product_attention(
                    q, k, v, is_causal=causal, scale=scale, enable_gqa=True).transpose(0, 1)
        ctx.save_for_backward(query, key, value, cu_seq_q, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad):
        with launch_count.one_launch("varlen_attention_backward"):
            grads = tuple(torch.zeros_like(x) for x in ctx.saved_tensors[:3])
        return (*grads, None, None, None)


def varlen_stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
    """torch's ``varlen_attn`` signature (what model/attention.py's fast path calls)."""
    return _VarlenStandIn.apply(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale)


@contextlib.contextmanager
def gpu_code_paths():
    """The GPU's code paths on the CPU: what each module checks to choose them says yes."""
    on_gpu = lambda tensor: True  # noqa: E731
    with contextlib.ExitStack() as stack:
        for module in (packed_rope, norms, output_loss, qkv_fusion, bias_gelu, residual_norm):
            stack.enter_context(mock.patch.object(module, "_on_gpu", on_gpu))
        for module in (multi_tensor, fused_adam):  # tensor lists: a GPU's when not empty
            stack.enter_context(mock.patch.object(module, "_on_gpu", bool))
        stack.enter_context(mock.patch.object(attention.SDPACoreAttention, "flash_varlen_applies",
                                              lambda self, query: True))
        stack.enter_context(mock.patch.object(attention, "packed_attention_kernel",
                                              lambda name: varlen_stand_in))
        positions = vision.patch_positions  # computed on the host, then copied, on a GPU too

        def host_patch_positions(*args, **kwargs):
            with launch_count.on_host("patch_positions"):
                return positions(*args, **kwargs)

        stack.enter_context(mock.patch.object(vision, "patch_positions", host_patch_positions))
        yield


def gpu_kernel_options(args) -> dict:
    """build_model's kernel and recompute keywords as the trainer chooses them on a GPU
    (training/kernels.py asked with CUDA reported present), from the trainer's switches in
    ``args`` (arguments.add_kernel_arguments, add_recompute_arguments, and ``bf16``)."""
    with mock.patch.object(torch.cuda, "is_available", lambda: True):
        return kernels.model_options(args)
