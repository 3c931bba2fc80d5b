"""The merger ("adapter") between the vision tower and the language model.

LayerNorm on every patch feature, then each 2x2 window of neighbouring patches (4 consecutive
rows, thanks to the window-grouped patch order) is concatenated to ``4*vision_hidden`` and sent
through Linear -> GELU -> Linear to the language hidden size: one LLM token per window.

The two linears are tensor-parallel (column- then row-parallel, one all-reduce), so at TP=n each
rank holds 1/n of the adapter like the rest of the model.

Parameter names (HF in brackets)::

    layernorm.{weight,bias}     [visual.merger.ln_q.*]
    linear_fc1.{weight,bias}    [visual.merger.mlp.0.*]
    linear_fc2.{weight,bias}    [visual.merger.mlp.2.*]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class VisionAdapter(MegatronModule):
    def __init__(self, config: TransformerConfig, vision_hidden: int, text_hidden: int,
                 merge_size: int = 2, eps: float = 1e-5):
        super().__init__(config=config)
        self.group = merge_size * merge_size
        merged = vision_hidden * self.group
        self.layernorm = nn.LayerNorm(vision_hidden, eps=eps)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            merged, merged, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            merged, text_hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[n_patches, vision_hidden] -> [n_patches / 4, text_hidden]``."""
        if features.shape[0] % self.group:
            raise ValueError(f"{features.shape[0]} patches is not a multiple of {self.group}")
        x = self.layernorm(features).reshape(-1, 1, features.shape[-1] * self.group)
        x, _ = self.linear_fc1(x)  # megatron linears expect [s, b, h]
        x, _ = self.linear_fc2(F.gelu(x))
        return x.squeeze(1)
