"""Map a :class:`LlavaOVConfig` to megatron-core ``TransformerConfig`` objects.

Two configs, because the towers differ in every architectural switch (norm type, biases, MLP,
activation, heads) and because the vision tower is never pipeline-split: its config always says
``pipeline_model_parallel_size=1`` so megatron builds all its layers, numbered from 0, on the
first pipeline stage. Tensor parallelism is shared by both towers.

Choices that hold for both and why:

* ``apply_rope_fusion=False``: the fused ``thd`` RoPE kernel assumes positions restart at 0 in
  every packed segment; we pass explicit per-token rotary angles (2D for the vision tower,
  ``position_ids`` for the LLM), which megatron's unfused path applies exactly.
* ``fused_kernels`` (on by default with CUDA): megatron's fused SwiGLU in the language model;
  same gradients to float rounding (tested on CPU). The vision tower does not take megatron's
  fused bias-GELU, the tanh approximation, not the exact GELU RICE-ViT was trained with; on a
  GPU its fc1 bias and exact GELU are compiled together instead (``compiled_bias_gelu``,
  compat/bias_gelu.py). It takes megatron's fused bias-dropout-add (``bias_dropout_fusion``, a
  torch.compile'd kernel): the attention and MLP outputs' biases and the residual in one pass,
  2 launches fewer per layer forward; the backward keeps its count, a compiled kernel in
  place of each bias's reduction (benchmarks/bench_launches.py). The language model has no
  biases, so its residual add is one kernel either way. Where the norms are compiled, each
  residual add (bias-dropout-add) joins the kernel of the norm after it, in both towers
  (model/residual_norm.py). megatron's fused cross entropy
  (``cross_entropy_loss_fusion``, the trainer's ``--cross-entropy-loss-fusion``) is on by
  default for bf16 on CUDA where the loss is not
  chunked (``--loss-chunk-tokens 0``; model/output_loss.py replaces it): its backward casts
  the logits' gradient to bf16 whatever the logits' dtype, so for bf16 logits it equals the
  unfused path bit for bit (tests/test_model_language.py) while fp32 logits may lose precision:
  the 0.2% gradient difference measured earlier on CPU with fp32 (CPU runs it through
  torch.compile, whose results for fp32 varied between runs in our tries).
* ``gradient_accumulation_fusion=False`` here; the trainer turns it on with CUDA
  (``kernels.gradient_accumulation_fusion``; without APEX on compat/wgrad_accumulation.py).
* dropout 0: neither RICE-ViT nor Qwen3 uses dropout.
* ``sequence_parallel=False`` unless the caller asks (the trainer's ``--sequence-parallel``),
  and then only for the language model: the model merges image features into the token
  embeddings before scattering the sequence (``llava_ov.py``), and the vision tower's images
  run whole on every TP rank.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.model.configs import LlavaOVConfig


def _common(tp: int, params_dtype: torch.dtype, use_cpu_initialization: Optional[bool],
            perform_initialization: bool) -> dict:
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    return dict(
        tensor_model_parallel_size=tp,
        sequence_parallel=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def vision_transformer_config(cfg: LlavaOVConfig, *, tensor_model_parallel_size: int = 1,
                              params_dtype: torch.dtype = torch.float32,
                              use_cpu_initialization: Optional[bool] = None,
                              perform_initialization: bool = True,
                              fused_kernels: Optional[bool] = None,
                              **extra: Any) -> TransformerConfig:
    vi = cfg.vision
    if fused_kernels is None:
        fused_kernels = torch.cuda.is_available()
    fusions = dict(bias_dropout_fusion=fused_kernels)
    config = TransformerConfig(
        num_layers=vi.num_layers,
        hidden_size=vi.hidden_size,
        ffn_hidden_size=vi.ffn_hidden_size,
        num_attention_heads=vi.num_attention_heads,
        num_query_groups=vi.num_attention_heads,
        kv_channels=vi.head_dim,
        normalization="LayerNorm",
        layernorm_epsilon=vi.layernorm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU, as HF ACT2FN["gelu"]
        qk_layernorm=False,
        pipeline_model_parallel_size=1,
        pipeline_dtype=params_dtype,
        init_method_std=cfg.init_method_std,
        **{**_common(tensor_model_parallel_size, params_dtype, use_cpu_initialization,
                     perform_initialization), **fusions, **extra},
    )
    config.compiled_bias_gelu = fused_kernels  # read per call: compat/bias_gelu.py
    return config


def language_transformer_config(cfg: LlavaOVConfig, *, tensor_model_parallel_size: int = 1,
                                pipeline_model_parallel_size: int = 1,
                                params_dtype: torch.dtype = torch.float32,
                                use_cpu_initialization: Optional[bool] = None,
                                perform_initialization: bool = True,
                                fused_kernels: Optional[bool] = None, **extra: Any) -> TransformerConfig:
    lm = cfg.language
    pp = pipeline_model_parallel_size
    if fused_kernels is None:
        fused_kernels = torch.cuda.is_available()
    fusions = dict(bias_activation_fusion=fused_kernels)
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=lm.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=F.silu,
        qk_layernorm=True,
        # 1D RoPE from position_ids: megatron only reads position_ids for RoPE in its mrope mode;
        # with the whole rotary half in the first section it is exactly 1D RoPE (see language.py)
        mrope_section=[lm.head_dim // 2, 0, 0],
        pipeline_model_parallel_size=pp,
        pipeline_dtype=params_dtype,
        num_layers_in_first_pipeline_stage=cfg.num_layers_in_first_pipeline_stage if pp > 1 else None,
        num_layers_in_last_pipeline_stage=cfg.num_layers_in_last_pipeline_stage if pp > 1 else None,
        init_method_std=cfg.init_method_std,
        **{**_common(tensor_model_parallel_size, params_dtype, use_cpu_initialization,
                     perform_initialization), **fusions, **extra},
    )


def transformer_configs(cfg: LlavaOVConfig, **kwargs: Any) -> Tuple[TransformerConfig, TransformerConfig]:
    """(vision, language) configs; ``pipeline_model_parallel_size`` only affects the language one."""
    pp = kwargs.pop("pipeline_model_parallel_size", 1)
    return (vision_transformer_config(cfg, **kwargs),
            language_transformer_config(cfg, pipeline_model_parallel_size=pp, **kwargs))
