"""HF <-> megatron-core parameter mapping for LLaVA-OneVision-1.5 (unsharded, TP=1 / PP=1 names).

The converter issue builds on this: it reshards these full tensors over TP/PP (megatron's
``sharded_state_dict`` does that for dist checkpoints). HF names are the on-disk names of the
released checkpoints (``visual.*``, ``model.*``, ``lm_head.*``); the newer transformers layout
(``model.visual.*``, ``model.language_model.*``) is accepted too and normalised first.

Tensor layouts that are not a rename:

* LLM ``linear_qkv``: megatron groups rows per KV group ``g``:
  ``[q heads of g (heads/groups * d) ; k_g (d) ; v_g (d)]`` from HF ``q_proj``/``k_proj``/``v_proj``.
* vision ``linear_qkv`` (weight and bias): HF ``attn.qkv`` rows are ``[3, heads, d]``; megatron's
  are ``[heads, 3, d]`` (each head is its own query group).
* LLM ``linear_fc1`` = ``cat(gate_proj, up_proj)`` along rows (megatron SwiGLU order).
* everything else is a rename (table below); local-spec names. With the TE spec the pre-norms are
  ``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*`` (see ``layer_specs``).
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from megatron_patch.model.configs import LlavaOVConfig

# mcore suffix <- HF suffix, per vision block
_VISION_BLOCK = {
    "input_layernorm.weight": "norm1.weight", "input_layernorm.bias": "norm1.bias",
    "self_attention.linear_proj.weight": "attn.proj.weight",
    "self_attention.linear_proj.bias": "attn.proj.bias",
    "pre_mlp_layernorm.weight": "norm2.weight", "pre_mlp_layernorm.bias": "norm2.bias",
    "mlp.linear_fc1.weight": "mlp.fc1.weight", "mlp.linear_fc1.bias": "mlp.fc1.bias",
    "mlp.linear_fc2.weight": "mlp.fc2.weight", "mlp.linear_fc2.bias": "mlp.fc2.bias",
}
_VISION_TOP = {
    "vision_model.patch_embed.proj.weight": "visual.patch_embed.proj.weight",
    "vision_model.class_embedding": "visual.class_embedding",
    "vision_model.class_pos_emb": "visual.class_pos_emb",
    "vision_model.pre_layernorm.weight": "visual.pre_layernorm.weight",
    "vision_model.pre_layernorm.bias": "visual.pre_layernorm.bias",
    "adapter.layernorm.weight": "visual.merger.ln_q.weight",
    "adapter.layernorm.bias": "visual.merger.ln_q.bias",
    "adapter.linear_fc1.weight": "visual.merger.mlp.0.weight",
    "adapter.linear_fc1.bias": "visual.merger.mlp.0.bias",
    "adapter.linear_fc2.weight": "visual.merger.mlp.2.weight",
    "adapter.linear_fc2.bias": "visual.merger.mlp.2.bias",
}
_LM_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_LM_TOP = {
    "language_model.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "language_model.decoder.final_layernorm.weight": "model.norm.weight",
    "language_model.output_layer.weight": "lm_head.weight",
}


def normalize_hf_name(name: str) -> str:
    """New transformers layout -> on-disk layout (``visual.*``, ``model.*``)."""
    name = re.sub(r"^model\.visual\.", "visual.", name)
    return re.sub(r"^model\.language_model\.", "model.", name)


def _qkv_lm_to_mcore(q, k, v, heads: int, groups: int, d: int) -> torch.Tensor:
    hid = q.shape[-1]
    q = q.reshape(groups, heads // groups * d, hid)
    k, v = k.reshape(groups, d, hid), v.reshape(groups, d, hid)
    return torch.cat([q, k, v], dim=1).reshape(-1, hid)


def _qkv_lm_to_hf(w, heads: int, groups: int, d: int):
    hid = w.shape[-1]
    w = w.reshape(groups, (heads // groups + 2) * d, hid)
    q, k, v = w.split([heads // groups * d, d, d], dim=1)
    return q.reshape(-1, hid), k.reshape(-1, hid), v.reshape(-1, hid)


def _qkv_vision_swap(t: torch.Tensor, heads: int, to_mcore: bool) -> torch.Tensor:
    tail = t.shape[1:]
    shape = (3, heads, -1) if to_mcore else (heads, 3, -1)
    return t.reshape(*shape, *tail).transpose(0, 1).reshape(-1, *tail)


def hf_to_mcore(hf: Dict[str, torch.Tensor], cfg: LlavaOVConfig) -> Dict[str, torch.Tensor]:
    """Full HF state dict (or the language-only ``model.*``/``lm_head.*`` part, or the vision-only
    ``visual.*`` part) -> full megatron state dict with local-spec names."""
    hf = {normalize_hf_name(k): v for k, v in hf.items()}
    out: Dict[str, torch.Tensor] = {}
    vi, lm = cfg.vision, cfg.language
    if any(k.startswith("visual.") for k in hf):
        for m, h in _VISION_TOP.items():
            out[m] = hf[h]
        for i in range(vi.num_layers):
            src, dst = f"visual.blocks.{i}.", f"vision_model.decoder.layers.{i}."
            for m, h in _VISION_BLOCK.items():
                out[dst + m] = hf[src + h]
            for kind in ("weight", "bias"):
                out[dst + f"self_attention.linear_qkv.{kind}"] = _qkv_vision_swap(
                    hf[src + f"attn.qkv.{kind}"], vi.num_attention_heads, to_mcore=True)
    if any(k.startswith("model.") for k in hf):
        for m, h in _LM_TOP.items():
            if h in hf:
                out[m] = hf[h]
        if "language_model.output_layer.weight" not in out:  # tied checkpoint: copy embedding
            out["language_model.output_layer.weight"] = hf["model.embed_tokens.weight"]
        for i in range(lm.num_layers):
            src, dst = f"model.layers.{i}.", f"language_model.decoder.layers.{i}."
            for m, h in _LM_LAYER.items():
                out[dst + m] = hf[src + h]
            out[dst + "self_attention.linear_qkv.weight"] = _qkv_lm_to_mcore(
                hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
                hf[src + "self_attn.v_proj.weight"], lm.num_attention_heads,
                lm.num_query_groups, lm.head_dim)
            out[dst + "mlp.linear_fc1.weight"] = torch.cat(
                [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0)
    return out


def mcore_to_hf(mc: Dict[str, torch.Tensor], cfg: LlavaOVConfig) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_mcore` (on-disk HF names)."""
    out: Dict[str, torch.Tensor] = {}
    vi, lm = cfg.vision, cfg.language
    for m, h in {**_VISION_TOP, **_LM_TOP}.items():
        if m in mc:
            out[h] = mc[m]
    for i in range(vi.num_layers):
        src, dst = f"vision_model.decoder.layers.{i}.", f"visual.blocks.{i}."
        if src + "mlp.linear_fc1.weight" not in mc:
            break
        for m, h in _VISION_BLOCK.items():
            out[dst + h] = mc[src + m]
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = _qkv_vision_swap(
                mc[src + f"self_attention.linear_qkv.{kind}"], vi.num_attention_heads, to_mcore=False)
    for i in range(lm.num_layers):
        src, dst = f"language_model.decoder.layers.{i}.", f"model.layers.{i}."
        if src + "mlp.linear_fc1.weight" not in mc:
            break
        for m, h in _LM_LAYER.items():
            out[dst + h] = mc[src + m]
        q, k, v = _qkv_lm_to_hf(mc[src + "self_attention.linear_qkv.weight"],
                                lm.num_attention_heads, lm.num_query_groups, lm.head_dim)
        out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"] = q, k
        out[dst + "self_attn.v_proj.weight"] = v
        gate, up = mc[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
    return out
