"""Packed-sequence RoPE without host syncs, for megatron-core 0.16's unfused RoPE.

Both towers hand megatron one rotary angle per packed token (``position_ids`` restart in every
conversation; each image patch has its 2-D angles). For that case megatron's
``_apply_rotary_pos_emb_thd`` cuts the angles into one slice per segment and concatenates them
back unchanged, reading ``cu_seqlens`` on the host to do so (``.tolist()``, a tensor compared in
an ``if``, one ``.item()`` per segment). With CUDA each read waits for every queued kernel, and
it happens for the query and the key of every attention layer, again under recompute: about
2 x layers x (segments + 2) stalls per micro-batch, each leaving the GPU idle while Python
launches the next kernels.

With one angle per token and no context parallelism that result is exactly the ``bshd``
rotation of the whole packed tensor, which :func:`apply` makes megatron's attention call
directly. Every other case (fused RoPE, context parallelism, angles per position rather than
per token) goes to megatron's function unchanged. Applies on CPU and GPU alike.

Angles that need a gradient (the vision tower's, whose class-token angle is learned, while the
tower trains) also stay on megatron's path: the query's and the key's contributions to that
gradient add up in another order there, equal only to rounding, and the demo's trajectory
(deterministic run to run) is sensitive enough to end elsewhere after thousands of steps
(overall accuracy 74.8% instead of 91.3%). So the fast path covers the language model always,
and the vision tower when it is frozen.

On a GPU the rotation is one compiled kernel instead (:func:`fused_rotation`): megatron's
unfused rotation is ~12 elementwise kernels forward and ~7 backward for each of the query and
the key (cos, sin, two scalings and two casts of the angles, the products, ``rotate_half``'s
negation and concatenation, the final concatenation). The one H200 profile (2026-12-04,
docs/BENCHMARKS.md) showed a host-bound step of ~165 launches per layer, a quarter of them
RoPE's. The compiled version computes in fp32 and rounds once, so it is not bit-identical to
megatron's bf16 arithmetic (GPU kernels are not bit-reproducible anyway); it covers the packed
per-token case and the plain ``[s, b, h, d]`` one, learned angles included (their gradient comes
from the compiled backward). The CPU keeps megatron's arithmetic (the demo's trajectory above).
"""
from __future__ import annotations

import functools
import importlib

import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings import rope_utils

_APPLIED = False


def _context_parallel_size(cp_group) -> int:
    if cp_group is not None:
        return cp_group.size()
    return parallel_state.get_context_parallel_world_size()


def rotate(t: torch.Tensor, freqs: torch.Tensor, mscale: float = 1.0) -> torch.Tensor:
    """RoPE on ``t`` (``[..., d]``) by angles ``freqs`` broadcast against it (``[..., d]``, the
    two halves of the last dimension rotated as pairs: megatron's non-interleaved layout),
    computed in fp32 (or t's wider type) and rounded once to ``t``'s dtype. Compiled on a GPU:
    one kernel.

    Written half by half rather than with megatron's ``rotate_half`` (the same products and
    sums, so the same bits): compiled with angles that take a gradient (the vision tower's),
    the concatenated ``rotate_half`` made torch.compile keep an fp32 copy of each of the query
    and key for the backward (17% of a vision layer's activations), where this form keeps only
    the bf16 input and the angles."""
    compute = torch.promote_types(t.dtype, torch.float32)
    x, angles = t.to(compute), freqs.to(compute)
    first, second = x.chunk(2, dim=-1)
    cos_first, cos_second = (torch.cos(angles) * mscale).chunk(2, dim=-1)
    sin_first, sin_second = (torch.sin(angles) * mscale).chunk(2, dim=-1)
    return torch.cat((first * cos_first - second * sin_first,
                      second * cos_second + first * sin_second), dim=-1).to(t.dtype)


@functools.lru_cache(maxsize=None)
def fused_rotation():
    """:func:`rotate` through ``torch.compile`` (built on first use; shapes that vary, as the
    vision tower's do, become dynamic after the second)."""
    return torch.compile(rotate)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def angle_per_row(rows: int, freqs, config, cp_group) -> bool:
    """One angle per row of the ``rows`` rotated (per packed token, or per position of
    ``[s, b, h, d]``), no megatron RoPE fusion and no context parallelism: the cases the fast
    paths take."""
    return (freqs.dim() == 4 and freqs.size(0) == rows and not config.apply_rope_fusion
            and _context_parallel_size(cp_group) == 1)


def compiled_rotation_applies(freqs, config, rows: int, head_dim: int, cp_group) -> bool:
    """Whether :func:`rotate` computes megatron's rotation of ``rows`` rows of heads of
    ``head_dim`` by ``freqs``: switched on for the model (``build_model(rope_fusion=...)``,
    ``--no-rope-fusion``), one angle per row, the whole head rotated, in megatron's plain (not
    interleaved, not MLA) layout. Also what model/qkv_fusion.py asks."""
    return (getattr(config, "compiled_rope", False) and freqs.size(-1) == head_dim
            and not config.rotary_interleaved and not config.multi_latent_attention
            and angle_per_row(rows, freqs, config, cp_group))


def _fusable(t, freqs, config, cu_seqlens, cp_group) -> bool:
    """Whether :func:`fused_rotation` runs for this call: on a GPU, ``t`` in the packed
    ``[t, h, d]`` or the ``[s, b, h, d]`` layout, and :func:`compiled_rotation_applies`."""
    layout_ok = t.dim() == 3 if cu_seqlens is not None else t.dim() == 4
    return (_on_gpu(t) and layout_ok
            and compiled_rotation_applies(freqs, config, t.size(0), t.size(-1), cp_group))


def per_token_rotation(original):
    """megatron's ``apply_rotary_pos_emb`` with the one-angle-per-token packed case taken
    without reading ``cu_seqlens``, and on a GPU the rotation fused (see the module docstring)."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        if _fusable(t, freqs, config, cu_seqlens, cp_group):
            # packed: t [tokens, heads, d], freqs [tokens, 1, 1, d] -> [tokens, 1, d]
            angles = freqs.squeeze(1) if cu_seqlens is not None else freqs
            return fused_rotation()(t, angles, float(mscale))
        if (cu_seqlens is not None and not freqs.requires_grad
                and angle_per_row(t.size(0), freqs, config, cp_group)):
            return rope_utils._apply_rotary_pos_emb_bshd(
                t.unsqueeze(1), freqs, rotary_interleaved=config.rotary_interleaved,
                multi_latent_attention=config.multi_latent_attention, mscale=mscale).squeeze(1)
        return original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)

    return apply_rotary_pos_emb


def apply() -> None:
    """Install the fast path in megatron's attention (once)."""
    global _APPLIED
    if _APPLIED:
        return
    attention = importlib.import_module("megatron.core.transformer.attention")
    attention.apply_rotary_pos_emb = per_token_rotation(attention.apply_rotary_pos_emb)
    _APPLIED = True
