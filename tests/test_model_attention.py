"""Packed (``thd``) attention in SDPACoreAttention: the per-segment SDPA loop against a dense
masked reference, and the flash ``varlen_attn`` fast path's adapter.

torch's ``varlen_attn`` runs on CUDA only, so here it is played by stand-ins with the two
signatures torch releases gave it (2.10: ``is_causal``; later: ``window_size``, ``scale``,
``enable_gqa``). Each stand-in computes attention its own way (a dense block-diagonal mask) and
leaves padding rows as NaN, as the real kernel leaves them unwritten. The real kernel against the
loop runs in tests/test_model_gpu.py.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.model import attention
from megatron_patch.model.attention import SDPACoreAttention, flash_varlen

HEADS, GROUPS, HEAD_DIM = 4, 2, 16
SEGMENTS = [5, 9, 1, 7]  # three samples and a one-token one
PADDED = 26  # 22 real rows, then 4 rows of trailing padding outside every segment


def dense_reference(q, k, v, cu, causal, scale):
    """Softmax attention in float64 with an explicit block-diagonal (+ causal) mask."""
    t = q.shape[0]
    segment = torch.full((t,), -1)
    for index, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        segment[start:end] = index
    allowed = (segment[:, None] == segment[None, :]) & (segment[:, None] >= 0)
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()
    out = torch.einsum("hqk,khd->qhd", weights, v.double()).to(q.dtype)
    out[segment < 0] = float("nan")  # what the kernel leaves in rows it does not write
    return out


class _UnwrittenGradient(torch.autograd.Function):
    """Identity whose backward leaves NaN in the rows outside every segment, as the real
    kernel's backward leaves them unwritten."""

    @staticmethod
    def forward(ctx, x, outside):
        ctx.save_for_backward(outside)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (outside,) = ctx.saved_tensors
        return grad.masked_fill(outside[:, None, None], float("nan")), None


def kernel_like(q, k, v, cu, causal, scale):
    outside = torch.arange(q.shape[0]) >= cu[-1]
    q, k, v = (_UnwrittenGradient.apply(x, outside) for x in (q, k, v))
    return dense_reference(q, k, v, cu, causal, scale)


class Kernel210:
    """torch 2.10's signature: causality as ``is_causal``; no scale, no GQA."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                 return_aux=None):
        self.calls.append(dict(cu_dtype=cu_seq_q.dtype, max_q=max_q, max_k=max_k,
                               causal=is_causal, kv_heads=key.shape[1]))
        assert key.shape[1] == query.shape[1], "2.10 has no GQA: heads must be repeated"
        return kernel_like(query, key, value, cu_seq_q, is_causal, query.shape[-1] ** -0.5)


class KernelLater:
    """Later releases: ``window_size`` ((-1, 0) = causal), ``scale``, ``enable_gqa``."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                 scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                 block_table=None, num_splits=None):
        causal = tuple(window_size) == (-1, 0)
        self.calls.append(dict(cu_dtype=cu_seq_q.dtype, max_q=max_q, max_k=max_k, causal=causal,
                               kv_heads=key.shape[1], gqa=enable_gqa, scale=scale))
        assert enable_gqa or key.shape[1] == query.shape[1]
        return kernel_like(query, key, value, cu_seq_q, causal, scale)


def packed_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(PADDED, HEADS, HEAD_DIM, generator=generator)
    k, v = (torch.randn(PADDED, GROUPS, HEAD_DIM, generator=generator) for _ in range(2))
    cu = torch.tensor([0] + list(torch.tensor(SEGMENTS).cumsum(0)), dtype=torch.int64)
    return q, k, v, cu


def core_attention(mask_type):
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM,
                               num_attention_heads=HEADS, num_query_groups=GROUPS,
                               kv_channels=HEAD_DIM, attention_dropout=0.0)
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=mask_type,
                             attention_type="self")


def packed_params(cu, max_len=max(SEGMENTS)):
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


@pytest.mark.parametrize("causal", [True, False])
def test_segment_loop_equals_the_dense_reference(causal):
    q, k, v, cu = packed_inputs()
    module = core_attention(AttnMaskType.causal if causal else AttnMaskType.no_mask)
    out = module(q, k, v, None, packed_seq_params=packed_params(cu)).view(PADDED, HEADS, -1)
    want = dense_reference(q, k, v, cu, causal, HEAD_DIM ** -0.5)
    real = int(cu[-1])
    torch.testing.assert_close(out[:real], want[:real], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[real:], torch.zeros_like(out[real:]))  # padding rows stay zero


@pytest.mark.parametrize("kernel_class", [Kernel210, KernelLater])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_varlen_adapter_speaks_each_torch_signature(kernel_class, causal):
    q, k, v, cu = (x.requires_grad_() if x.is_floating_point() else x
                   for x in packed_inputs(seed=1))
    kernel = kernel_class()
    out = flash_varlen(kernel, q, k, v, cu, cu, 9, 9, causal, HEAD_DIM ** -0.5)
    want = core_attention(AttnMaskType.causal if causal else AttnMaskType.no_mask)._forward_packed(
        q, k, v, packed_params(cu), causal).view(PADDED, HEADS, -1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # padding: NaN in, zeros out
    # gradients too: the rows the kernel leaves unwritten (NaN here) come back as zeros
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * probe).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * probe).sum(), (q, k, v))
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (call,) = kernel.calls
    assert call["cu_dtype"] == torch.int32 and (call["max_q"], call["max_k"]) == (9, 9)
    assert call["causal"] is causal
    if kernel_class is KernelLater:  # GQA and scale passed through, K/V not repeated
        assert call["gqa"] and call["kv_heads"] == GROUPS and call["scale"] == HEAD_DIM ** -0.5
    else:
        assert call["kv_heads"] == HEADS


def test_a_scale_the_kernel_cannot_take_falls_back():
    q, k, v, cu = packed_inputs()
    kernel = Kernel210()
    assert flash_varlen(kernel, q, k, v, cu, cu, 9, 9, True, 0.5 / math.sqrt(HEAD_DIM)) is None
    assert kernel.calls == []


def test_packed_attention_uses_the_kernel_only_where_it_applies(monkeypatch):
    q, k, v, cu = packed_inputs(seed=2)
    module = core_attention(AttnMaskType.causal)
    loop = module(q, k, v, None, packed_seq_params=packed_params(cu))
    assert not module.flash_varlen_applies(q)  # CPU: never
    assert not module.flash_varlen_applies(q.to(torch.bfloat16))

    kernel = KernelLater()
    monkeypatch.setattr(attention, "flash_varlen_kernel", lambda: kernel)
    monkeypatch.setattr(SDPACoreAttention, "flash_varlen_applies", lambda self, query: True)
    fast = module(q, k, v, None, packed_seq_params=packed_params(cu))
    assert len(kernel.calls) == 1 and fast.shape == loop.shape == (PADDED, HEADS * HEAD_DIM)
    torch.testing.assert_close(fast, loop, rtol=1e-5, atol=1e-5)
    # without the maximum segment length (which the kernel needs) the loop runs
    module(q, k, v, None, packed_seq_params=packed_params(cu, max_len=None))
    assert len(kernel.calls) == 1


def test_covering_segments_skip_the_padding_guard(monkeypatch):
    """Segments that end at the last row (checked on the host when the params are built) leave
    no row unwritten: the kernel is called on the inputs as they are, with no masking pass."""
    q, k, v, _ = packed_inputs(seed=3)
    cu = torch.tensor([0, 5, 9, PADDED])  # trailing rows counted as a segment, as collate does
    longest = int((cu[1:] - cu[:-1]).max())
    guarded = flash_varlen(KernelLater(), q, k, v, cu, cu, longest, longest, True,
                           HEAD_DIM ** -0.5)

    masking_callers, masked_fill = [], torch.Tensor.masked_fill

    def recorded_masked_fill(*args, **kwargs):  # the stand-in kernel masks too: note who calls
        masking_callers.append(sys._getframe(1).f_code.co_filename)
        return masked_fill(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "masked_fill", recorded_masked_fill)
    kernel = KernelLater()
    monkeypatch.setattr(attention, "flash_varlen_kernel", lambda: kernel)
    monkeypatch.setattr(SDPACoreAttention, "flash_varlen_applies", lambda self, query: True)
    params = attention.covering_packed_seq_params(cu, PADDED, longest, torch.device("cpu"))
    assert params.cu_seqlens_q.dtype == torch.int32
    unguarded = core_attention(AttnMaskType.causal)(q, k, v, None, packed_seq_params=params)
    assert len(kernel.calls) == 1
    torch.testing.assert_close(unguarded.view(PADDED, HEADS, -1), guarded, rtol=0, atol=0)
    assert attention.__file__ not in masking_callers and masking_callers  # the kernel's own only
    # the same segments in plain PackedSeqParams (a caller that did not check them): guarded
    core_attention(AttnMaskType.causal)(q, k, v, None, packed_seq_params=packed_params(cu))
    assert masking_callers.count(attention.__file__) == 4  # q, k, v and the output


def test_segments_that_stop_short_of_the_last_row_are_refused():
    with pytest.raises(ValueError, match="segments end at row 9 of 12: the last segment must end"):
        attention.covering_packed_seq_params(torch.tensor([0, 5, 9]), 12, 5, torch.device("cpu"))


@pytest.mark.parametrize("path", ["segment-loop", "kernel"])
def test_fixed_segment_counts_change_nothing(monkeypatch, path):
    """``with_fixed_segments`` (what the language layers' CUDA graphs need: one shape of
    ``cu_seqlens``, one ``max_seqlen``) appends empty segments at the last row and raises the
    longest segment to every row: the same attention, exactly, in the segment loop and through
    the kernel (its stand-in here; the real one in tests/test_model_gpu.py)."""
    q, k, v, _ = packed_inputs(seed=5)
    cu = torch.tensor([0, 5, 14, PADDED])
    params = attention.covering_packed_seq_params(cu, PADDED, 12, torch.device("cpu"))
    fixed = attention.with_fixed_segments(params, 7, PADDED)
    assert fixed.cu_seqlens_q.tolist() == [0, 5, 14, PADDED, PADDED, PADDED, PADDED, PADDED]
    assert fixed.cu_seqlens_kv is fixed.cu_seqlens_q and fixed.cu_seqlens_q.dtype == torch.int32
    assert (fixed.max_seqlen_q, fixed.max_seqlen_kv) == (PADDED, PADDED)
    assert isinstance(fixed, attention.CoveringPackedSeqParams)  # still no padding guard
    if path == "kernel":
        kernel = KernelLater()
        monkeypatch.setattr(attention, "flash_varlen_kernel", lambda: kernel)
        monkeypatch.setattr(SDPACoreAttention, "flash_varlen_applies", lambda self, query: True)
    module = core_attention(AttnMaskType.causal)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    results = []
    for packed in (params, fixed):
        out = module(q, k, v, None, packed_seq_params=packed)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
    (out, grads), (fixed_out, fixed_grads) = results
    torch.testing.assert_close(fixed_out, out, rtol=0, atol=0)
    for a, b in zip(fixed_grads, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if path == "kernel":
        assert [call["max_q"] for call in kernel.calls] == [12, PADDED]


def test_more_segments_than_the_graphs_hold_are_refused():
    params = attention.covering_packed_seq_params(torch.tensor([0, 5, 9, 12]), 12, 5,
                                                  torch.device("cpu"))
    assert attention.with_fixed_segments(params, 3, 12).cu_seqlens_q.tolist() == [0, 5, 9, 12]
    with pytest.raises(ValueError, match="has 3 segments .* more than the 2 its CUDA graphs"):
        attention.with_fixed_segments(params, 2, 12)


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_kernel_takes_the_same_packed_call(monkeypatch, causal):
    """``packed_attention_kernel="cudnn"`` (``--packed-attention-kernel cudnn``): the packed call
    goes to torch's cuDNN op with the segments, their longest, causality and the scale, KV heads
    repeated for the query groups; it gives the segment loop's result. The op needs CUDA, so the
    dense reference plays it here; the real one runs in tests/test_model_gpu.py."""
    calls = []

    def cudnn_op(q, k, v, bias, cu_q, cu_k, max_q, max_k, logsumexp, dropout, is_causal,
                 debug_mask, *, scale):
        calls.append(dict(heads=(q.shape[1], k.shape[1]), cu=cu_q.tolist(), cu_k=cu_k.tolist(),
                          longest=(max_q, max_k), causal=is_causal, scale=scale,
                          logsumexp=logsumexp, dropout=dropout, bias=bias))
        return kernel_like(q, k, v, cu_q, is_causal, scale), None

    monkeypatch.setattr(attention, "_cudnn_forward", cudnn_op)
    q, k, v, _ = packed_inputs(seed=6)
    params = attention.covering_packed_seq_params(torch.tensor([0, 5, 14, PADDED]), PADDED, 12,
                                                  torch.device("cpu"))
    module = core_attention(AttnMaskType.causal if causal else AttnMaskType.no_mask)
    loop = module(q, k, v, None, packed_seq_params=params)
    module.config.packed_attention_kernel = "cudnn"
    monkeypatch.setattr(SDPACoreAttention, "flash_varlen_applies", lambda self, query: True)
    fused = module(q, k, v, None, packed_seq_params=params)
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)
    assert calls == [dict(heads=(HEADS, HEADS), cu=[0, 5, 14, PADDED], cu_k=[0, 5, 14, PADDED],
                          longest=(12, 12), causal=causal, scale=module.softmax_scale,
                          logsumexp=True, dropout=0.0, bias=None)]
    with pytest.raises(ValueError, match="one of \\('flash', 'cudnn'\\)"):
        attention.packed_attention_kernel("triton")
