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
"""
from __future__ import annotations

import functools
import importlib

from megatron.core import parallel_state
from megatron.core.models.common.embeddings import rope_utils

_APPLIED = False


def _context_parallel_size(cp_group) -> int:
    if cp_group is not None:
        return cp_group.size()
    return parallel_state.get_context_parallel_world_size()


def per_token_rotation(original):
    """megatron's ``apply_rotary_pos_emb`` with the one-angle-per-token packed case taken
    without reading ``cu_seqlens`` (see the module docstring)."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None):
        if (cu_seqlens is not None and not config.apply_rope_fusion and freqs.dim() == 4
                and freqs.size(0) == t.size(0) and not freqs.requires_grad
                and _context_parallel_size(cp_group) == 1):
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
