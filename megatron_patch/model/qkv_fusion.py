"""Self-attention whose query/key/value preparation is one compiled function on a GPU.

Between the fused qkv projection and the attention kernel, megatron's ``SelfAttention`` splits
the projection's output per query group, copies the queries into heads (a reshape of a strided
slice), normalises queries and keys per head (Qwen3's q/k RMSNorm) and rotates them (RoPE); the
packed attention kernel then copies the value to make it contiguous. With the compiled norms and
RoPE that is six launches forward per language layer, and six backward (with the concatenation
of the three gradients into the projection's); the vision tower, without q/k norms, has three
and three. Each reads and writes a whole query- or key-sized tensor, and launches are what set
the pace of a host-bound step (docs/BENCHMARKS.md, "Kernel launches").

:class:`FusedQKVSelfAttention` runs the same steps as one ``torch.compile``'d function of the
projection's output (:func:`prepare_qkv`), which also adds the projection's bias (the vision
tower's: one kernel fewer each way). Its backward writes the projection's gradient directly.
What it keeps for the backward is the projection's output, the angles and the norms'
statistics: not the query's copy (32 MiB per language layer at 8192 tokens) that the separate
norm kept. Inductor does not round fused intermediates (torch's default), so the normalised
query reaches its rotation unrounded; the rotation computes in fp32 and rounds once. The result
is within a bf16 rounding of the separate kernels'.

It applies where the separate compiled kernels would: with the model's ``rope_fusion``, and
``norm_fusion`` where the layer has q/k norms; on a GPU; with one rotary angle per token, no
context parallelism, no inference and no output gate. Everything else is megatron's code. The
CPU keeps megatron's arithmetic (the demo's trajectory depends on it).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp

from megatron_patch.compat.packed_rope import compiled_rotation_applies, rotate
from megatron_patch.model.norms import CompiledRMSNorm, rms_norm


def prepare_qkv(mixed: torch.Tensor, angles: torch.Tensor, bias: Optional[torch.Tensor],
                query_norm: Optional[torch.Tensor], key_norm: Optional[torch.Tensor], *,
                heads_per_group: int, head_dim: int, eps: float,
                mscale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention's inputs from the qkv projection's output ``mixed`` (``[s, b, groups *
    (heads_per_group + 2) * head_dim]``, megatron's layout: each query group's query heads, then
    its key and its value) and its ``bias`` (if any): query ``[s, b, heads, d]`` and key
    ``[s, b, groups, d]``, normalised by the per-head RMSNorm weights (if given) and rotated by
    ``angles`` (``[s, 1 or b, 1, d]``), and the value ``[s, b, groups, d]``, all contiguous."""
    if bias is not None:
        mixed = mixed + bias
    rows, batch = mixed.shape[:2]
    grouped = mixed.view(rows, batch, -1, heads_per_group + 2, head_dim)
    # queries and keys stay views [s, b, groups, heads, d] of ``mixed`` until their rotation:
    # reshaped first, the query would be a copy, which the compiled backward keeps
    query, key = grouped[:, :, :, :heads_per_group], grouped[:, :, :, heads_per_group:-1]
    if query_norm is not None:
        query, key = rms_norm(query, query_norm, eps), rms_norm(key, key_norm, eps)
    angles = angles.unsqueeze(-2)  # [s, b, 1, 1, d]
    query, key = (rotate(x, angles, mscale).reshape(rows, batch, -1, head_dim)
                  for x in (query, key))
    return query, key, grouped[:, :, :, -1].contiguous()


@functools.lru_cache(maxsize=None)
def compiled_preparation(heads_per_group: int, head_dim: int, eps: float, mscale: float):
    """:func:`prepare_qkv` for one attention shape through ``torch.compile`` (built on first use,
    dynamic in the token count, which the vision tower's images vary)."""
    return torch.compile(functools.partial(prepare_qkv, heads_per_group=heads_per_group,
                                           head_dim=head_dim, eps=eps, mscale=mscale),
                         dynamic=True)


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


class FusedQKVSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` (same parameters, checkpoints and results), with the
    query/key/value preparation fused where :meth:`fused_preparation_applies`."""

    _angles: Optional[torch.Tensor] = None  # set for the duration of a fused forward

    def _has_qk_norms(self) -> bool:
        return not all(norm is None or isinstance(norm, IdentityOp)
                       for norm in (self.q_layernorm, self.k_layernorm))

    def fused_preparation_applies(self, hidden_states, kwargs) -> bool:
        config, rotary = self.config, kwargs.get("rotary_pos_emb")
        # the projection's rows: under sequence parallelism it gathers the whole sequence
        rows = hidden_states.size(0) * (self.world_size if config.sequence_parallel else 1)
        norms_fusable = not self._has_qk_norms() or all(
            isinstance(norm, CompiledRMSNorm) for norm in (self.q_layernorm, self.k_layernorm))
        plain_call = all(kwargs.get(name) is None for name in (
            "key_value_states", "inference_context", "inference_params", "rotary_pos_cos",
            "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias"))
        return (norms_fusable and plain_call and _on_gpu(hidden_states)
                and isinstance(rotary, torch.Tensor)
                and compiled_rotation_applies(rotary, config, rows,
                                              self.hidden_size_per_attention_head,
                                              self.pg_collection.cp)
                and not (config.no_rope_freq or config.test_mode or config.attention_output_gate
                         or config.fused_single_qkv_rope)
                and config.num_query_groups >= self.world_size)

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        if args or not self.fused_preparation_applies(hidden_states, kwargs):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        # megatron's forward then runs unchanged, except that get_query_key_value_tensors
        # returns rotated queries and keys, so megatron is given no angles to rotate by again
        self._angles = kwargs.pop("rotary_pos_emb")
        try:
            return super().forward(hidden_states, attention_mask, rotary_pos_emb=None, **kwargs)
        finally:
            self._angles = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate=False, split_qkv=True):
        if self._angles is None:
            return super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                       output_gate=output_gate,
                                                       split_qkv=split_qkv)
        mixed_qkv, bias = self._projection_and_bias(hidden_states)
        heads_per_group = (self.num_attention_heads_per_partition
                           // self.num_query_groups_per_partition)
        has_norms = self._has_qk_norms()
        norms = (self.q_layernorm.weight, self.k_layernorm.weight) if has_norms else (None, None)
        eps = self.q_layernorm.eps if has_norms else 0.0
        prepare = compiled_preparation(heads_per_group, self.hidden_size_per_attention_head,
                                       eps, _yarn_get_concentration_factor_from_config(self.config))
        return prepare(mixed_qkv, self._angles, bias, *norms)

    def _projection_and_bias(self, hidden_states):
        """The qkv projection without its bias, and the bias (None without one), so that the
        compiled preparation adds it: one kernel fewer each way (the vision tower's)."""
        linear = self.linear_qkv
        if linear.bias is None:
            return linear(hidden_states)
        linear.skip_bias_add = True  # megatron's switch: return the bias instead of adding it
        try:
            return linear(hidden_states)
        finally:
            linear.skip_bias_add = False
