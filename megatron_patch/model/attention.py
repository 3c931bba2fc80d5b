"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron-core specs.

Why our own: megatron's local ``DotProductAttention`` takes its scratch buffer from the global
memory buffer on the CUDA device and has no packed-sequence (``thd``) support, and Transformer
Engine is GPU-only. This module is the ``core_attention`` of the local layer spec and handles the
three cases the model needs:

* causal attention over ``[s, b, h, d]`` (language model, one sample per row);
* packed sequences (``PackedSeqParams`` with ``qkv_format='thd'``, ``q`` is ``[t, h, d]``):
  attention stays inside each ``cu_seqlens`` segment, i.e. a block-diagonal (and, for the LLM,
  causal within the block) mask -- computed segment by segment so no ``t x t`` mask is built;
* non-causal attention within each image for the vision tower (``attn_mask_type=no_mask`` with
  the images packed as ``thd`` segments).

Grouped-query attention is handled by repeating K/V heads. RoPE has already been applied by
megatron's ``Attention`` before this module is called, so no position logic lives here.

Packed sequences on a GPU in bf16/fp16 go through torch's own variable-length flash attention
(``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10): one kernel call per layer instead of
one SDPA call per segment (a typical 8192-token pack of long-tailed SFT data holds 7
conversations, some up to 45: hundreds of small launches per micro-batch) and a host sync per
layer. This is the fast path where Transformer Engine is not
installed; elsewhere (CPU, fp32, older torch) the segment loop runs. The same call can go to
torch's cuDNN attention instead (``packed_attention_kernel="cudnn"``, the kernel SDPA runs for
nested jagged tensors; on Hopper cuDNN's fused attention is of FlashAttention-3's generation,
torch's in-tree flash kernel of FlashAttention-2's), with the same ``cu_seqlens``.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_patch.model.host_tensors import to_device

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class CoveringPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` whose segments cover every row (``cu_seqlens[-1] == t``), checked on
    the host when they were built (:func:`covering_packed_seq_params`). The varlen kernel then
    writes every output row, so the padding guard's elementwise passes (12 kernels per layer,
    forward and backward; ~7% of a micro-batch's launches on a host-bound GPU step,
    docs/BENCHMARKS.md) are left out."""


def covering_packed_seq_params(cu_seqlens: torch.Tensor, rows: int, max_seqlen: int,
                               device: torch.device) -> CoveringPackedSeqParams:
    """thd ``PackedSeqParams`` from host-side ``cu_seqlens`` that must end at ``rows`` (tokens
    past the last segment would be attended by nothing and left unwritten by the kernel)."""
    if cu_seqlens.device.type != "cpu":
        raise ValueError("cu_seqlens must be on the host here: checking it on the device would "
                         "cost a sync per micro-batch")
    if int(cu_seqlens[-1]) != rows:
        raise ValueError(f"packed segments end at row {int(cu_seqlens[-1])} of {rows}: the last "
                         "segment must end at the last row (count trailing padding as a segment)")
    cu = to_device(cu_seqlens.to(torch.int32), device)
    return CoveringPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                   max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def with_fixed_segments(params: PackedSeqParams, segments: int, rows: int) -> PackedSeqParams:
    """The same packed sequence described with exactly ``segments`` segments and a longest
    segment of ``rows``: what a captured CUDA graph needs (``--cuda-graph-impl local``), since
    it replays kernels launched for one shape of ``cu_seqlens`` and one ``max_seqlen``, which
    megatron's graph manager checks on every replay. The added segments are empty (they start
    and end at the last row): attention gives them no rows, so the result is unchanged. Runs
    on the device copy without reading it (the count is its shape), so no sync.

    The cost: the varlen kernel's grid has a block per segment and per 128 rows of
    ``max_seqlen``; the empty ones return at once."""
    cu = params.cu_seqlens_q
    if (params.cu_seqlens_kv is not cu or params.cu_seqlens_q_padded is not None
            or params.cu_seqlens_kv_padded is not None):
        raise ValueError("fixed segment counts are for self-attention over one set of "
                         "cu_seqlens (the trainer's packs)")
    present = cu.numel() - 1
    if present > segments:
        raise ValueError(f"a packed micro-batch has {present} segments (samples and trailing "
                         f"padding), more than the {segments} its CUDA graphs were captured "
                         "for; keep --max-samples-per-pack below that count")
    cu = torch.nn.functional.pad(cu, (0, segments - present), value=rows)
    return dataclasses.replace(params, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=rows,
                               max_seqlen_kv=rows)


@functools.lru_cache(maxsize=None)  # asked once per layer call: import once
def flash_varlen_kernel() -> Optional[Callable]:
    """torch's ``varlen_attn`` (flash attention over ``cu_seqlens``), or None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _cudnn_forward(*args, **kwargs):
    """torch's ``aten._cudnn_attention_forward`` (one place calls it; tests stand in for it)."""
    return torch.ops.aten._cudnn_attention_forward(*args, **kwargs)


def cudnn_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, *,
                      scale: Optional[float] = None, window_size=(-1, -1),
                      enable_gqa: bool = False) -> torch.Tensor:
    """Attention within each ``cu_seqlens`` segment through torch's cuDNN kernel, with the
    signature of torch's ``varlen_attn`` so :func:`flash_varlen` drives either: q
    ``[t, hq, d]``, k/v ``[t, hkv, d]`` (KV heads repeated for the query groups), window
    ``(-1, 0)`` causal, ``(-1, -1)`` full."""
    if tuple(window_size) not in ((-1, 0), (-1, -1)):
        raise ValueError(f"cuDNN packed attention: no sliding window ({window_size})")
    if key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return _cudnn_forward(query, key, value, None, cu_seq_q, cu_seq_k, max_q, max_k, True, 0.0,
                          tuple(window_size) == (-1, 0), False, scale=scale)[0]


PACKED_ATTENTION_KERNELS = ("flash", "cudnn")


def check_packed_attention_kernel(name: str) -> str:
    """``name`` if it is one of :data:`PACKED_ATTENTION_KERNELS`, else a ValueError."""
    if name not in PACKED_ATTENTION_KERNELS:
        raise ValueError(f"packed attention kernel must be one of {PACKED_ATTENTION_KERNELS}, "
                         f"not {name!r}")
    return name


def packed_attention_kernel(name: str) -> Optional[Callable]:
    """The kernel packed bf16/fp16 attention takes on a GPU: torch's varlen flash kernel (None
    before torch 2.10) or :func:`cudnn_varlen_attn`."""
    if check_packed_attention_kernel(name) == "cudnn":
        return cudnn_varlen_attn
    return flash_varlen_kernel()


@functools.lru_cache(maxsize=None)
def _keywords(kernel: Callable) -> frozenset:
    return frozenset(inspect.signature(kernel).parameters)


def flash_varlen(kernel: Callable, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
                 scale: float, guard_padding: bool = True) -> Optional[torch.Tensor]:
    """Packed attention through ``kernel`` (``varlen_attn``), adapting to the signatures torch
    releases gave it: 2.10 takes ``is_causal``, later ones ``window_size`` ((-1, 0) = causal);
    ``scale`` and ``enable_gqa`` are not in every release. Returns None when this release
    cannot compute what was asked (a non-default scale it does not take); the caller falls back.

    q: [t, hq, d]; k, v: [t, hkv, d]; cu_q/cu_k: [n+1] offsets into t. The kernel neither writes
    the output rows past cu_q[-1] (trailing padding outside every segment) nor the gradients of
    such rows; both are zeroed here, without a host sync, unless ``guard_padding`` is False
    (segments known to cover every row: :class:`CoveringPackedSeqParams`).
    """
    keywords = _keywords(kernel)
    options = {}
    if "window_size" in keywords:
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        options["is_causal"] = causal
    if "scale" in keywords:
        options["scale"] = scale
    elif not math.isclose(scale, q.shape[-1] ** -0.5):
        return None
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in keywords:
            options["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    if not guard_padding:
        q, k, v = (x.contiguous() for x in (q, k, v))
        return kernel(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **options)
    pad_q, pad_k = (torch.arange(x.shape[0], device=x.device)[:, None, None] >= cu[-1]
                    for x, cu in ((q, cu_q), (k, cu_k)))
    # masked_fill's backward zeroes the gradient rows the kernel leaves unwritten
    q = q.masked_fill(pad_q, 0).contiguous()
    k, v = (x.masked_fill(pad_k, 0).contiguous() for x in (k, v))
    out = kernel(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **options)
    return out.masked_fill(pad_q, 0)


class SDPACoreAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule (same constructor/forward contract as megatron's)."""

    flash_varlen_enabled = True  # False forces the per-segment loop (comparisons, benchmarks)

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) > 1:
            raise NotImplementedError("SDPACoreAttention does not implement context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def _sdpa(self, q, k, v, causal: bool, mask: Optional[torch.Tensor] = None):
        """q/k/v: [b, h, s, d]; mask: bool, True = attend (torch convention)."""
        if k.shape[1] != q.shape[1]:  # GQA: repeat each KV head for its query group
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is not None and causal:
            sq, sk = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
            causal = False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale)

    def flash_varlen_applies(self, query) -> bool:
        """Whether packed attention on ``query`` goes through the varlen kernel (if torch has it)."""
        return (self.flash_varlen_enabled and query.is_cuda and query.dtype in _FLASH_DTYPES and query.shape[-1] % 8 == 0
                and query.shape[-1] <= 256 and (self.dropout_p == 0 or not self.training))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPACoreAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in _CAUSAL

        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(query, key, value, packed_seq_params, causal)

        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None
        if attention_mask is not None and mask_type != AttnMaskType.no_mask:
            # megatron convention: True = masked out; torch SDPA: True = attend
            mask = ~attention_mask.to(torch.bool)
        out = self._sdpa(q, k, v, causal, mask)
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _forward_packed(self, query, key, value, params, causal: bool):
        """q/k/v: [t, h, d] holding several sequences back to back (``cu_seqlens``)."""
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        kernel = (packed_attention_kernel(getattr(self.config, "packed_attention_kernel", "flash"))
                  if self.flash_varlen_applies(query) else None)
        if kernel is not None and params.max_seqlen_q and params.max_seqlen_kv:
            out = flash_varlen(kernel, query, key, value, cu_q, cu_k, params.max_seqlen_q,
                               params.max_seqlen_kv, causal, self.softmax_scale,
                               guard_padding=not isinstance(params, CoveringPackedSeqParams))
            if out is not None:
                return out.reshape(out.shape[0], -1)
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        out = query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
        for i in range(len(bounds_q) - 1):
            q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
            if q1 == q0:
                continue
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in
                       (query[q0:q1], key[k0:k1], value[k0:k1]))
            out[q0:q1] = self._sdpa(q, k, v, causal).squeeze(0).transpose(0, 1)
        # rows past cu[-1] are padding; they stay zero and carry no loss
        return out.reshape(out.shape[0], -1)
