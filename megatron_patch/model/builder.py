"""Build the model for the current parallel state (what the trainer calls).

``build_model(cfg, ...)`` returns one :class:`LlavaOVModel` for this rank's pipeline stage and
tensor-parallel shard; ``make_model_provider(cfg, ...)`` returns the
``model_provider(pre_process, post_process, vp_stage=None)`` callable megatron-style training
loops expect. ``megatron.core.parallel_state.initialize_model_parallel`` must have run first
(also for TP=PP=1: megatron's layers query the groups).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_block import TransformerBlock

from megatron_patch.compat import (apply_bias_gelu_fusion, apply_cpu_redirects,
                                   apply_packed_rope_fast_path, apply_selective_recompute_fixes,
                                   apply_single_rank_tp_shortcuts,
                                   apply_wgrad_accumulation)
from megatron_patch.model.attention import check_packed_attention_kernel
from megatron_patch.model.configs import LlavaOVConfig
from megatron_patch.model.layer_specs import language_block_spec, resolve_backend, vision_layer_spec
from megatron_patch.model.llava_ov import LlavaOVModel
from megatron_patch.model.residual_norm import fuse_residual_adds
from megatron_patch.model.transformer_configs import (language_transformer_config,
                                                      vision_transformer_config)


def build_model(cfg: LlavaOVConfig, *, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None, attention_backend: str = "auto",
                params_dtype: torch.dtype = torch.float32, vp_stage: Optional[int] = None,
                use_cpu_initialization: Optional[bool] = None, perform_initialization: bool = True,
                fused_kernels: Optional[bool] = None, sequence_parallel: bool = False,
                rope_fusion: Optional[bool] = None, norm_fusion: Optional[bool] = None,
                loss_chunk_tokens: int = 0,
                cuda_graph_segments: Optional[int] = None,
                packed_attention_kernel: str = "flash",
                **transformer_config_extra: Any) -> LlavaOVModel:
    """One pipeline stage of the model. ``pre_process``/``post_process`` default to whether this
    rank is the first/last pipeline stage. ``fused_kernels`` (default: with CUDA) selects the
    language model's fused SwiGLU and cross entropy; ``rope_fusion`` (default: with CUDA) both
    towers' compiled RoPE kernel on GPU tensors (compat/packed_rope.py), ``norm_fusion`` (the
    same default) their compiled norms (model/norms.py). ``sequence_parallel``
    applies to the language model only: the vision tower's images are short and each runs whole
    on every TP rank. ``loss_chunk_tokens > 0`` computes the training loss's output layer and
    cross entropy that many tokens at a time, never holding the whole logits
    (model/output_loss.py). ``cuda_graph_segments``: the language decoder layers run as
    megatron-core's local CUDA graphs (``cuda_graph_impl="local"``), captured for packs of that
    many segments (the trainer's ``--cuda-graph-impl local``; needs CUDA).
    ``packed_attention_kernel``: "flash" or "cudnn", the GPU kernel of packed bf16 attention in
    the local spec (model/attention.py). Extra keyword
    arguments go to both megatron ``TransformerConfig``s (e.g. ``recompute_granularity``,
    ``variable_seq_lengths``)."""
    apply_cpu_redirects()  # no-op with CUDA
    apply_packed_rope_fast_path()
    apply_wgrad_accumulation()  # gradient_accumulation_fusion=True without APEX
    apply_selective_recompute_fixes()  # recompute_modules "layernorm" / "mlp" without TE
    apply_bias_gelu_fusion()  # the vision MLP's, on a GPU
    apply_single_rank_tp_shortcuts()  # the linears' TP regions skipped at TP 1
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None,
                                                             vp_stage=vp_stage)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    backend = resolve_backend(attention_backend, params_dtype)
    common = dict(tensor_model_parallel_size=tp, params_dtype=params_dtype,
                  use_cpu_initialization=use_cpu_initialization,
                  perform_initialization=perform_initialization, **transformer_config_extra)
    vision_config = vision_transformer_config(cfg, fused_kernels=fused_kernels, **common)
    graphs = dict(cuda_graph_impl="local") if cuda_graph_segments else {}
    language_config = language_transformer_config(cfg, pipeline_model_parallel_size=pp,
                                                  fused_kernels=fused_kernels,
                                                  sequence_parallel=sequence_parallel,
                                                  **common, **graphs)
    check_packed_attention_kernel(packed_attention_kernel)  # refused before any module is built
    for config in (vision_config, language_config):  # read per call: compat/packed_rope.py,
        config.compiled_rope = torch.cuda.is_available() if rope_fusion is None else rope_fusion
        config.compiled_norm = torch.cuda.is_available() if norm_fusion is None else norm_fusion
        config.packed_attention_kernel = packed_attention_kernel  # model/attention.py
    model = LlavaOVModel(cfg, vision_config, language_config, vision_layer_spec(backend),
                         language_block_spec(backend, language_config, vp_stage),
                         pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                         loss_chunk_tokens=loss_chunk_tokens,
                         graph_segments=cuda_graph_segments)
    if params_dtype != torch.float32:
        model.to(params_dtype)  # plain nn modules (patch embed, norms, class token) follow megatron's
    for block in [m for m in model.modules() if isinstance(m, TransformerBlock)]:
        fuse_residual_adds(block)  # where the norms are compiled: model/residual_norm.py
    return model


def make_model_provider(cfg: LlavaOVConfig, **build_kwargs: Any) -> Callable[..., LlavaOVModel]:
    """``model_provider(pre_process=True, post_process=True, vp_stage=None)`` for megatron loops."""

    def model_provider(pre_process: bool = True, post_process: bool = True,
                       vp_stage: Optional[int] = None, **_: Any) -> LlavaOVModel:
        return build_model(cfg, pre_process=pre_process, post_process=post_process,
                           vp_stage=vp_stage, **build_kwargs)

    return model_provider


def count_parameters(model: torch.nn.Module) -> dict:
    """Parameter counts by tower on this rank (works on meta-device models)."""
    counts = {"vision": 0, "adapter": 0, "language": 0}
    for name, p in model.named_parameters():
        key = name.split(".", 1)[0]
        key = {"vision_model": "vision", "adapter": "adapter", "language_model": "language"}[key]
        counts[key] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
