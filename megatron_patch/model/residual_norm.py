"""The self-attention's residual add and the pre-MLP norm in one compiled kernel, on a GPU.

megatron's layer adds the attention's output (and, in the vision tower, its bias) to the
residual stream, then normalises the sum for the MLP: two kernels forward, an add and the norm.
In the backward, two gradients reach the sum (the MLP's residual path and the norm's), and
autograd adds them in one more kernel after the norm's. Each of these reads or writes the
``[tokens, hidden]`` stream once more than the work needs. Here one compiled function returns
the sum and its normalised value, and its backward adds the two gradients itself:
- language layer: 1 launch fewer each way;
- vision layer: 1 forward and 2 backward, since megatron's compiled bias-dropout-add and its
  bias gradient join it.
That is ~128 launches per micro-batch of the GPU benchmark (benchmarks/bench_launches.py), and
one pass less over the stream each way.

Megatron's layer forward is left as it is. :class:`ResidualNormLayer` replaces the layer's
self-attention bias-dropout-add with :class:`ResidualThenNorm`. That hands the normalised sum to
the pre-MLP norm (a compiled norm, model/norms.py) together with the sum it belongs to. The
norm returns it when megatron's layer calls the norm on that very tensor, which it does next,
and computes as usual otherwise.

Arithmetic: the sum is rounded once to the stream's dtype, as megatron's add (eager, or its
compiled bias-dropout-add) rounds it. The norm reads the rounded sum (inductor's
``emulate_precision_casts``), so the forward gives the unfused path's values. The backward adds
the two gradients in fp32 before one rounding, where the unfused path rounds the norm's gradient
to bf16 first.

It applies where the norms are compiled (``config.compiled_norm``: with CUDA, unless
``--no-norm-fusion``) and the call's tensors are on a GPU, with no dropout (neither tower has
any) and with the pre-MLP norm neither recomputed (selective ``layernorm``) nor offloaded:
those wrap megatron's norm call, which this would bypass. The CPU keeps megatron's kernels.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_patch.model.norms import CompiledLayerNorm, CompiledRMSNorm, layer_norm, rms_norm


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def residual_sum(branch: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: torch.Tensor) -> torch.Tensor:
    """megatron's ``residual + (branch + bias)`` in fp32, rounded once to the stream's dtype."""
    total = branch.float() if bias is None else branch.float() + bias.float()
    return (residual.float() + total).to(branch.dtype)


def add_rms_norm(branch, bias, residual, weight, eps):
    total = residual_sum(branch, bias, residual)
    return total, rms_norm(total, weight, eps)


def add_layer_norm(branch, bias, residual, weight, norm_bias, eps):
    total = residual_sum(branch, bias, residual)
    return total, layer_norm(total, weight, norm_bias, eps)


@functools.lru_cache(maxsize=None)
def compiled(function):
    """``function`` through ``torch.compile`` with dynamic shapes (the vision tower's token
    counts vary), the norm reading the sum as rounded to the stream's dtype."""
    return torch.compile(function, dynamic=True, options={"emulate_precision_casts": True})


def add_and_normalize(norm: torch.nn.Module, branch, bias, residual):
    """(sum, norm(sum)) in one compiled kernel with ``norm``'s parameters."""
    if isinstance(norm, CompiledRMSNorm):
        return compiled(add_rms_norm)(branch, bias, residual, norm.weight, norm.eps)
    return compiled(add_layer_norm)(branch, bias, residual, norm.weight, norm.bias, norm.eps)


class ResidualThenNorm:
    """Takes the place of megatron's self-attention bias-dropout-add (``get_bias_dropout_add``,
    called as ``bda(training, fused)(output_with_bias, residual, prob)``). It returns the same
    sum, and hands the pre-MLP norm its output. Anything this does not cover goes to megatron's
    function."""

    def __init__(self, norm: torch.nn.Module):
        self.norm = norm

    def __call__(self, training: bool, fused: bool):
        megatrons = get_bias_dropout_add(training, fused)

        def bias_dropout_add(output_with_bias, residual, prob):
            branch, bias = output_with_bias
            if ((training and prob) or not _on_gpu(branch) or residual.dtype != branch.dtype
                    or residual.shape != branch.shape):
                return megatrons(output_with_bias, residual, prob)
            total, normalized = add_and_normalize(self.norm, branch, bias, residual)
            self.norm.hand_over(total, normalized)
            return total

        return bias_dropout_add


class ResidualNormLayer(TransformerLayer):
    """megatron's ``TransformerLayer``, its self-attention's residual add fused into the
    pre-MLP norm where that applies (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if fuses_residual_into_norm(self):
            self.self_attn_bda = ResidualThenNorm(self.pre_mlp_layernorm)


def fuses_residual_into_norm(layer: TransformerLayer) -> bool:
    """Whether the layer's pre-MLP norm is a compiled one that megatron calls directly."""
    return (isinstance(layer.pre_mlp_layernorm, (CompiledRMSNorm, CompiledLayerNorm))
            and not layer.recompute_pre_mlp_layernorm
            and not getattr(layer, "offload_mlp_norm", False)
            and not getattr(layer, "offload_attn_norm", False))
