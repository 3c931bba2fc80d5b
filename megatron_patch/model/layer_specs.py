"""Layer specs for the language model and the vision tower, two families chosen at run time.

* ``te``: Transformer Engine modules (fused LayerNorm+Linear, TE DotProductAttention which uses
  flash / cuDNN fused attention, packed ``thd`` sequences natively). Needs CUDA, the
  ``transformer_engine`` package (extra ``[gpu]``) and bf16/fp16 weights.
* ``local``: megatron-core's own modules (tensor-parallel linears) with torch norms
  (:class:`~megatron_patch.model.norms.TorchNorm`, which also runs under sequence parallelism)
  and :class:`~megatron_patch.model.attention.SDPACoreAttention` as core attention (torch SDPA;
  for packed sequences in bf16 on CUDA, torch's varlen flash kernel); on a GPU the self-attention
  prepares queries, keys and values in one compiled kernel
  (:class:`~megatron_patch.model.qkv_fusion.FusedQKVSelfAttention`). Runs anywhere, including
  CPU/gloo.

``resolve_backend("auto", params_dtype)`` picks ``te`` when both are available and the weights
are bf16/fp16 (:func:`te_dtype_problem`), and otherwise falls back to ``local``, logging the
reason once per process. ``--attention-backend te|local`` forces one
(forcing ``te`` without TE is an error, not a silent fallback).

Both families give the same parameter *roles*; their names differ only where TE fuses the
pre-norm into the next linear (``input_layernorm.weight`` vs
``self_attention.linear_qkv.layer_norm_weight``). megatron's ``sharded_state_dict_keys_map`` on
the local spec maps the local names to the TE names, so distributed checkpoints are
interchangeable between the two. (TE's norms also keep an ``_extra_state``, FP8 metadata that a
local-spec checkpoint lacks; loading skips those: ``training/checkpointing.py``.)
"""
from __future__ import annotations

import copy
import importlib.util
import logging
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_patch.model.attention import SDPACoreAttention
from megatron_patch.model.norms import TorchNorm
from megatron_patch.model.qkv_fusion import FusedQKVSelfAttention

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "te", "local")
_LOGGED = set()


def _log_once(msg: str, level: int = logging.WARNING) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logger.log(level, msg)


def te_available() -> Optional[str]:
    """None when the TE spec can run here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # broken install (ABI mismatch, missing libs)
        return f"transformer_engine failed to import ({type(exc).__name__}: {exc})"
    return None


def te_dtype_problem(params_dtype: torch.dtype) -> Optional[str]:
    """TE's only fp32 attention (its unfused one) refuses packed ``thd`` input, and the vision
    tower always packs its images that way: TE needs bf16 or fp16 weights here."""
    if params_dtype in (torch.bfloat16, torch.float16):
        return None
    return (f"Transformer Engine has no {params_dtype} attention for packed (thd) sequences, "
            "which the vision tower always uses (train with --bf16)")


def resolve_backend(requested: str = "auto", params_dtype: torch.dtype = torch.float32) -> str:
    """Return ``"te"`` or ``"local"``; ``auto`` falls back to ``local`` with one log line."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "local":
        return "local"
    missing = te_available()
    reason = missing or te_dtype_problem(params_dtype)
    if requested == "te":
        if reason:
            raise RuntimeError(f"--attention-backend te requested but {reason}")
        return "te"
    if reason:
        # a CPU run has no use for TE: said quietly; on a GPU the fallback costs speed
        level = logging.INFO if not torch.cuda.is_available() else logging.WARNING
        _log_once(f"Transformer Engine spec unavailable ({reason}); "
                  "using local megatron-core modules with torch SDPA attention", level)
        return "local"
    _log_once("Using Transformer Engine layer spec (flash/fused attention)")
    return "te"


def _with_mask_type(spec: ModuleSpec, mask_type: AttnMaskType) -> ModuleSpec:
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params or {}, attn_mask_type=mask_type)
    return spec


def language_layer_spec(backend: str) -> ModuleSpec:
    """Qwen3 decoder layer: RMSNorm pre-norms, q/k RMSNorm, GQA, causal, SwiGLU MLP."""
    from megatron.core.models.gpt import gpt_layer_specs as gls

    if backend == "te":
        return gls.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    spec = gls.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = TorchNorm
    attention.q_layernorm = attention.k_layernorm = TorchNorm
    attention.core_attention = SDPACoreAttention
    spec.submodules.self_attention.module = FusedQKVSelfAttention
    return spec


def language_block_spec(backend: str, config, vp_stage: Optional[int] = None):
    """This pipeline stage's decoder layers and the final norm. Given a layer spec alone,
    megatron would pick Transformer Engine's final norm whenever TE is installed, whichever
    spec the layers use, and otherwise one that refuses sequence parallelism."""
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = TorchNorm
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[language_layer_spec(backend)] * layers,
                                      layer_norm=final_norm)


def vision_layer_spec(backend: str) -> ModuleSpec:
    """RICE-ViT block: LayerNorm pre-norms, fused qkv with bias, bidirectional attention inside
    each image (images are packed as ``thd`` segments), GELU MLP with biases."""
    from megatron.core.models.gpt import gpt_layer_specs as gls

    if backend == "te":
        spec = gls.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    else:
        spec = gls.get_gpt_layer_local_spec(qk_layernorm=False, normalization="LayerNorm")
        layer = spec.submodules
        layer.input_layernorm = layer.pre_mlp_layernorm = TorchNorm  # compiled on a GPU
        layer.self_attention.submodules.core_attention = SDPACoreAttention
        layer.self_attention.module = FusedQKVSelfAttention
    return _with_mask_type(spec, AttnMaskType.no_mask)
