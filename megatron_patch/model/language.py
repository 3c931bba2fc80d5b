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

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.model.configs import LanguageConfig


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """Smallest multiple of the TP size >= vocab (the vocab-parallel embedding needs equal
    shards). No-op for the presets (151936 = 2^7 * 1187; tiny 512) at any TP up to 128."""
    tp = tensor_model_parallel_size
    return -(-vocab_size // tp) * tp


def build_language_model(lcfg: LanguageConfig, config: TransformerConfig,
                         block_spec: TransformerBlockSubmodules, pre_process: bool,
                         post_process: bool, vp_stage=None) -> GPTModel:
    """The embedding is not scattered over sequence-parallel ranks here: image features replace
    the ``<|image_pad|>`` embeddings first, and ``LlavaOVModel.forward`` scatters after that."""
    return GPTModel(
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
    )


def rope_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` -> ``[3, b, s]`` (identical rows) for the single-section mrope = 1D RoPE."""
    if position_ids.dim() == 3:
        return position_ids
    return position_ids.unsqueeze(0).expand(3, -1, -1)
