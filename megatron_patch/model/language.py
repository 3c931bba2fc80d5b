"""The Qwen3 language model as a megatron-core ``GPTModel``.

Qwen3 = RMSNorm pre-norms (eps 1e-6), GQA, per-head RMSNorm on q and k, no linear biases,
SwiGLU MLP, 1D RoPE, untied output layer. The layer spec comes from
:mod:`megatron_patch.model.layer_specs` (TE or local+SDPA).

RoPE positions come from ``position_ids`` (reset to 0 at every packed sample), like HF. megatron
computes RoPE from ``position_ids`` only in its ``mrope`` mode, so we use that mode with the whole
rotary half in the first (temporal) section -- ``mrope_section=[head_dim/2, 0, 0]`` -- and the
same ids in all three rows, which is exactly 1D RoPE. :func:`rope_position_ids` makes the
``[3, b, s]`` tensor from ``[b, s]``; it also accepts an already 3-row tensor.

Parameter names (HF ``model.language_model.*`` / ``lm_head`` in brackets; N = global layer index)::

    embedding.word_embeddings.weight                      [model.language_model.embed_tokens.weight]
    decoder.layers.N.input_layernorm.weight               [...layers.N.input_layernorm.weight]
    decoder.layers.N.self_attention.linear_qkv.weight     [...layers.N.self_attn.{q,k,v}_proj.weight]
        rows per query group g: [q heads of g (heads/groups * d); k_g (d); v_g (d)]
    decoder.layers.N.self_attention.q_layernorm.weight    [...layers.N.self_attn.q_norm.weight]
    decoder.layers.N.self_attention.k_layernorm.weight    [...layers.N.self_attn.k_norm.weight]
    decoder.layers.N.self_attention.linear_proj.weight    [...layers.N.self_attn.o_proj.weight]
    decoder.layers.N.pre_mlp_layernorm.weight             [...layers.N.post_attention_layernorm.weight]
    decoder.layers.N.mlp.linear_fc1.weight                [cat(mlp.gate_proj, mlp.up_proj), dim 0]
    decoder.layers.N.mlp.linear_fc2.weight                [...layers.N.mlp.down_proj.weight]
    decoder.final_layernorm.weight                        [model.language_model.norm.weight]
    output_layer.weight                                   [lm_head.weight]

With the TE spec the two pre-norms live in ``linear_qkv.layer_norm_weight`` and
``linear_fc1.layer_norm_weight``. Under pipeline parallelism the module-local layer index
restarts at 0 on each stage; ``sharded_state_dict`` keys use the global index.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.compat import tp_regions
from megatron_patch.model.configs import LanguageConfig
from megatron_patch.model.host_tensors import nonzero_on
from megatron_patch.model.output_loss import linear_cross_entropy


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """Smallest multiple of the TP size >= vocab (the vocab-parallel embedding needs equal
    shards). No-op for the presets (151936 = 2^7 * 1187; tiny 512) at any TP up to 128."""
    tp = tensor_model_parallel_size
    return -(-vocab_size // tp) * tp


def loss_token_indices(loss_mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Where ``loss_mask`` ``[b, s]`` is nonzero, as indices into the hidden states' ``[s, b]``
    token order, on ``device``; from a mask on the host without a device sync
    (model/host_tensors.py)."""
    return nonzero_on(loss_mask.transpose(0, 1).reshape(-1), device)


class LanguageModel(GPTModel):
    """megatron's GPTModel whose training loss may run chunked (``loss_chunk_tokens > 0``): the
    output layer and the cross entropy together, a chunk of tokens at a time, without the whole
    ``[tokens, vocab]`` logits (model/output_loss.py). Everything else -- logits without labels,
    inference, ``loss_chunk_tokens=0`` -- is megatron's own post-processing.

    With a ``loss_mask`` the chunked loss computes only the tokens in the loss: in SFT the
    prompt and image tokens (most of a sequence) would cost the output layer's three GEMMs for
    a loss the trainer multiplies by 0. Their per-token loss is returned as 0 and they get no
    gradient, which is exact wherever the caller's loss weighs them by the mask (the trainer's
    does). A mask on the host (the trainer passes the loader's) picks the tokens without a
    device sync."""

    def __init__(self, *args, loss_chunk_tokens: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = loss_chunk_tokens

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, **kwargs):
        chunked = (self.loss_chunk_tokens > 0 and self.post_process and labels is not None
                   and self.config.mtp_num_layers is None
                   and kwargs.get("inference_context") is None)
        if not chunked:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, **kwargs)
        return self.chunked_loss(hidden_states, labels, kwargs.get("loss_mask"))

    def chunked_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                     loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token loss ``[b, s]`` from the final hidden states ``[s(/TP), b, h]``: the input
        is gathered (sequence parallel) or copied to the TP ranks, as the output layer does;
        only the tokens where ``loss_mask`` ``[b, s]`` is nonzero are computed."""
        layer = self.output_layer
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else layer.weight)
        if layer.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=layer.tp_group)
        else:
            hidden = tp_regions.copy_to_tensor_model_parallel_region(
                hidden_states, group=layer.tp_group)
        s, b, h = hidden.shape
        hidden, labels = hidden.reshape(s * b, h), labels.transpose(0, 1).reshape(s * b)
        kept = None
        if loss_mask is not None:
            kept = loss_token_indices(loss_mask, hidden.device)
            hidden, labels = hidden.index_select(0, kept), labels.index_select(0, kept)
        loss = linear_cross_entropy(hidden, weight, labels, self.loss_chunk_tokens,
                                    tp_group=layer.tp_group,
                                    fuse_wgrad=layer.gradient_accumulation_fusion)
        if kept is not None:
            loss = loss.new_zeros(s * b).index_copy(0, kept, loss)
        return loss.view(s, b).transpose(0, 1).contiguous()


def build_language_model(lcfg: LanguageConfig, config: TransformerConfig,
                         block_spec: TransformerBlockSubmodules, pre_process: bool,
                         post_process: bool, vp_stage=None,
                         loss_chunk_tokens: int = 0) -> LanguageModel:
    """The embedding is not scattered over sequence-parallel ranks here: image features replace
    the ``<|image_pad|>`` embeddings first, and ``LlavaOVModel.forward`` scatters after that."""
    return LanguageModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=padded_vocab_size(lcfg.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=lcfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not lcfg.untie_embeddings_and_output_weights,
        position_embedding_type="mrope",
        rotary_percent=1.0,
        rotary_base=lcfg.rope_theta,
        scatter_embedding_sequence_parallel=False,
        vp_stage=vp_stage,
        loss_chunk_tokens=loss_chunk_tokens,
    )


def rope_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` -> ``[3, b, s]`` (identical rows) for the single-section mrope = 1D RoPE."""
    if position_ids.dim() == 3:
        return position_ids
    return position_ids.unsqueeze(0).expand(3, -1, -1)
