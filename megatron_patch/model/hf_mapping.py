"""HF <-> megatron-core parameter mapping for LLaVA-OneVision-1.5: the one table of names.

One table per model part (vision tower, adapter, language model), each row a :class:`Rule`:
the megatron-core parameter (local-spec name, ``{i}`` = layer index), the HF tensor(s) it is
made of, how they are fused, and the dimension megatron splits over tensor parallelism. The
converters (``megatron_patch.checkpoint_conversion``), the full-state-dict helpers below and the
tests all read these tables, so a name or layout lives in exactly one place.

HF names are the on-disk names of the released checkpoints (``visual.*``, ``model.*``,
``lm_head.*``); the newer transformers layout (``model.visual.*``, ``model.language_model.*``)
is accepted too (:func:`normalize_hf_name`) and can be written (:func:`hf_name_in_layout`).

Fusions (everything else is a rename):

* ``qkv_gqa`` -- LLM ``linear_qkv``: megatron groups rows per KV group ``g``:
  ``[q heads of g (heads/groups * d) ; k_g (d) ; v_g (d)]`` from HF ``q_proj``/``k_proj``/``v_proj``.
  Grouping by KV group is what makes a contiguous TP chunk hold whole groups.
* ``qkv_heads`` -- vision ``linear_qkv`` (weight and bias): HF ``attn.qkv`` rows are
  ``[3, heads, d]``; megatron's are ``[heads, 3, d]`` (each head is its own query group).
* ``gate_up`` -- LLM ``linear_fc1`` = ``cat(gate_proj, up_proj)`` along rows (megatron SwiGLU
  order). At TP=n each rank holds its chunk of gate *and* of up (see ``model.sharding``).

``tp_dim``: 0 for column-parallel linears and vocab-parallel embeddings, 1 for row-parallel
linears, ``None`` for tensors every TP rank holds whole (norms, biases added after the
all-reduce, the patch embedding and class token). With the TE spec the pre-norms are named
``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*``; dist checkpoints always use those
names (megatron's ``sharded_state_dict_keys_map``), module names follow the spec.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_patch.model.configs import LlavaOVConfig


@dataclass(frozen=True)
class Rule:
    mcore: str                    # megatron-core parameter name; "{i}" is the layer index
    hf: Tuple[str, ...]           # HF tensor name(s), flat on-disk layout; several = fused
    fuse: str = "copy"            # "copy" | "qkv_gqa" | "qkv_heads" | "gate_up"
    tp_dim: Optional[int] = None  # dim split over tensor parallelism (None = replicated)


def _r(mcore: str, hf, fuse: str = "copy", tp_dim: Optional[int] = None) -> Rule:
    return Rule(mcore, (hf,) if isinstance(hf, str) else tuple(hf), fuse, tp_dim)


def _layer(mcore_prefix: str, hf_prefix: str, rows) -> Tuple[Rule, ...]:
    """Per-layer rules: (mcore suffix, HF suffix or suffixes, fuse, tp_dim) under two prefixes."""
    return tuple(_r(mcore_prefix + m, [hf_prefix + x for x in ((h,) if isinstance(h, str) else h)], f, d)
                 for m, h, f, d in rows)


# ---- vision tower (RICE-ViT): plain modules, then one block per layer
VISION = (
    _r("vision_model.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
    _r("vision_model.class_embedding", "visual.class_embedding"),
    _r("vision_model.class_pos_emb", "visual.class_pos_emb"),
    _r("vision_model.pre_layernorm.weight", "visual.pre_layernorm.weight"),
    _r("vision_model.pre_layernorm.bias", "visual.pre_layernorm.bias"),
)
VISION_LAYER = _layer("vision_model.decoder.layers.{i}.", "visual.blocks.{i}.", (
    ("input_layernorm.weight", "norm1.weight", "copy", None),
    ("input_layernorm.bias", "norm1.bias", "copy", None),
    ("self_attention.linear_qkv.weight", "attn.qkv.weight", "qkv_heads", 0),
    ("self_attention.linear_qkv.bias", "attn.qkv.bias", "qkv_heads", 0),
    ("self_attention.linear_proj.weight", "attn.proj.weight", "copy", 1),
    ("self_attention.linear_proj.bias", "attn.proj.bias", "copy", None),
    ("pre_mlp_layernorm.weight", "norm2.weight", "copy", None),
    ("pre_mlp_layernorm.bias", "norm2.bias", "copy", None),
    ("mlp.linear_fc1.weight", "mlp.fc1.weight", "copy", 0),
    ("mlp.linear_fc1.bias", "mlp.fc1.bias", "copy", 0),
    ("mlp.linear_fc2.weight", "mlp.fc2.weight", "copy", 1),
    ("mlp.linear_fc2.bias", "mlp.fc2.bias", "copy", None),
))
# ---- adapter (HF "merger"): LayerNorm, column- then row-parallel linear
ADAPTER = (
    _r("adapter.layernorm.weight", "visual.merger.ln_q.weight"),
    _r("adapter.layernorm.bias", "visual.merger.ln_q.bias"),
    _r("adapter.linear_fc1.weight", "visual.merger.mlp.0.weight", tp_dim=0),
    _r("adapter.linear_fc1.bias", "visual.merger.mlp.0.bias", tp_dim=0),
    _r("adapter.linear_fc2.weight", "visual.merger.mlp.2.weight", tp_dim=1),
    _r("adapter.linear_fc2.bias", "visual.merger.mlp.2.bias"),
)
# ---- language model (Qwen3): embedding, layers, final norm, untied output layer
LANGUAGE = (
    _r("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight", tp_dim=0),
    _r("language_model.decoder.final_layernorm.weight", "model.norm.weight"),
    _r("language_model.output_layer.weight", "lm_head.weight", tp_dim=0),
)
LANGUAGE_LAYER = _layer("language_model.decoder.layers.{i}.", "model.layers.{i}.", (
    ("input_layernorm.weight", "input_layernorm.weight", "copy", None),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv_gqa", 0),
    ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight", "copy", None),
    ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight", "copy", None),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight", "copy", 1),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight", "copy", None),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up", 0),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight", "copy", 1),
))

# HF tensors that carry no weights (recomputed buffers some exporters save): skipped, not errors
IGNORED_HF = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), re.compile(r"(^|\.)rotary_pos_emb\.inv_freq$"))

PARTS = ("vision", "adapter", "language")
HF_LAYOUTS = ("flat", "nested")  # visual.* / model.*  vs  model.visual.* / model.language_model.*


@dataclass(frozen=True)
class Item:
    """One concrete megatron tensor and the HF tensors it is made of (a rule at a layer)."""
    mcore: str
    hf: Tuple[str, ...]
    fuse: str
    tp_dim: Optional[int]
    part: str


def items(cfg: LlavaOVConfig, parts: Sequence[str] = PARTS) -> List[Item]:
    """Every tensor of the model, rules expanded over the layers, in model order."""
    out: List[Item] = []
    tables = {"vision": ((VISION, 1), (VISION_LAYER, cfg.vision.num_layers)),
              "adapter": ((ADAPTER, 1),),
              "language": ((LANGUAGE[:1], 1), (LANGUAGE_LAYER, cfg.language.num_layers),
                           (LANGUAGE[1:], 1))}
    for part in parts:
        for rules, count in tables[part]:
            for i in range(count):
                out.extend(Item(r.mcore.format(i=i), tuple(h.format(i=i) for h in r.hf), r.fuse,
                                r.tp_dim, part) for r in rules)
    return out


def normalize_hf_name(name: str) -> str:
    """New transformers layout -> on-disk layout (``visual.*``, ``model.*``)."""
    name = re.sub(r"^model\.visual\.", "visual.", name)
    return re.sub(r"^model\.language_model\.", "model.", name)


def hf_name_in_layout(name: str, layout: str) -> str:
    """Flat on-disk name -> the name in ``layout`` (``flat`` or ``nested``)."""
    if layout == "flat":
        return name
    if layout != "nested":
        raise ValueError(f"HF key layout must be one of {HF_LAYOUTS}, got {layout!r}")
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def detect_hf_layout(names: Iterable[str]) -> str:
    names = list(names)
    nested = any(n.startswith(("model.visual.", "model.language_model.")) for n in names)
    return "nested" if nested else "flat"


def is_ignored_hf(name: str) -> bool:
    return any(p.search(name) for p in IGNORED_HF)


def hf_shapes(item: Item, mcore_shape: Sequence[int], cfg: LlavaOVConfig) -> List[Tuple[int, ...]]:
    """Shapes the HF tensors of ``item`` must have for a megatron tensor of ``mcore_shape``."""
    shape = tuple(mcore_shape)
    if item.fuse in ("copy", "qkv_heads"):
        return [shape]
    if item.fuse == "gate_up":
        return [(shape[0] // 2,) + shape[1:]] * 2
    lm = cfg.language
    q_rows, kv_rows = lm.num_attention_heads * lm.head_dim, lm.num_query_groups * lm.head_dim
    return [(q_rows,) + shape[1:], (kv_rows,) + shape[1:], (kv_rows,) + shape[1:]]


def fuse_to_mcore(item: Item, parts: Sequence[torch.Tensor], cfg: LlavaOVConfig) -> torch.Tensor:
    """HF tensors (in ``item.hf`` order) -> the megatron tensor."""
    if item.fuse == "copy":
        return parts[0]
    if item.fuse == "qkv_heads":
        return _qkv_vision_swap(parts[0], cfg.vision.num_attention_heads, to_mcore=True)
    if item.fuse == "gate_up":
        return torch.cat(list(parts), dim=0)
    lm = cfg.language
    return _qkv_lm_to_mcore(*parts, lm.num_attention_heads, lm.num_query_groups, lm.head_dim)


def split_to_hf(item: Item, tensor: torch.Tensor, cfg: LlavaOVConfig) -> List[torch.Tensor]:
    """The megatron tensor -> HF tensors (in ``item.hf`` order). Inverse of :func:`fuse_to_mcore`."""
    if item.fuse == "copy":
        return [tensor]
    if item.fuse == "qkv_heads":
        return [_qkv_vision_swap(tensor, cfg.vision.num_attention_heads, to_mcore=False)]
    if item.fuse == "gate_up":
        return list(tensor.chunk(2, dim=0))
    lm = cfg.language
    return list(_qkv_lm_to_hf(tensor, lm.num_attention_heads, lm.num_query_groups, lm.head_dim))


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
    ``visual.*`` part) -> full megatron state dict with local-spec names. A tied checkpoint (no
    ``lm_head.weight``) gets the embedding as its output layer."""
    hf = {normalize_hf_name(k): v for k, v in hf.items()}
    parts = []
    if any(k.startswith("visual.") for k in hf):
        parts += ["vision", "adapter"]
    if any(k.startswith("model.") for k in hf):
        parts.append("language")
        if "lm_head.weight" not in hf:
            hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    return {it.mcore: fuse_to_mcore(it, [hf[h] for h in it.hf], cfg) for it in items(cfg, parts)}


def mcore_to_hf(mc: Dict[str, torch.Tensor], cfg: LlavaOVConfig) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_mcore` (on-disk HF names); tensors absent from ``mc`` are skipped."""
    out: Dict[str, torch.Tensor] = {}
    for it in items(cfg):
        if it.mcore in mc:
            out.update(zip(it.hf, split_to_hf(it, mc[it.mcore], cfg)))
    return out
