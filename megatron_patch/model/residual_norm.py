"""Each residual add and the norm after it in one compiled kernel, on a GPU.

A pre-norm layer adds its attention's output (and, in the vision tower, that output's bias) to
the residual stream and normalises the sum for the MLP; it adds the MLP's output and the next
layer (or the final norm) normalises that sum. megatron runs each as two kernels forward, the
add and the norm. In the backward two gradients reach each sum (the residual path's and the
norm's), and autograd adds them in one more kernel after the norm's. Each of these reads or
writes the ``[tokens, hidden]`` stream once more than the work needs. Here one compiled
function returns the sum and its normalised value, and its backward adds the two gradients
itself. Per add, 1 launch fewer each way in the language model; in the vision tower 1 forward
and 2 backward, since megatron's compiled bias-dropout-add and its bias gradient join it. That is
~250 launches per micro-batch of the GPU benchmark (benchmarks/bench_launches.py), and one pass
less over the stream each way per add.

Megatron's layer and block forwards are left as they are. :func:`fuse_residual_adds` replaces a
layer's bias-dropout-add with :class:`ResidualThenNorm`, which hands the normalised sum to the
norm that reads the sum next, together with the sum it belongs to. The norm (a compiled norm,
model/norms.py) returns it when megatron calls the norm on that very tensor, which it does next,
and computes as usual otherwise.

Arithmetic: the sum is rounded once to the stream's dtype, as megatron's add (eager, or its
compiled bias-dropout-add) rounds it. The norm reads the rounded sum (inductor's
``emulate_precision_casts``), so the forward gives the unfused path's values. The backward adds
the two gradients in fp32 before one rounding, where the unfused path rounds the norm's gradient
to bf16 first.

It applies where the norms are compiled (``config.compiled_norm``: with CUDA, unless
``--no-norm-fusion``) and the call's tensors are on a GPU, with no dropout (neither tower has
any), and where megatron calls the norm directly: not recomputed (selective ``layernorm``) and
not offloaded, since those wrap the norm's call. The MLP's add is handed across layers, so not
under full recompute (a recomputed chunk's last layer would hand a sum to a norm outside the
chunk), with CUDA graphs (each layer's graph is its own) or megatron's CPU offloading between
layers. The CPU keeps megatron's kernels.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_block import TransformerBlock

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
    """Takes the place of megatron's bias-dropout-add (``get_bias_dropout_add``, called as
    ``bda(training, fused)(output_with_bias, residual, prob)``). It returns the same sum, and
    hands the norm that reads it next its output. Anything this does not cover goes to
    megatron's function."""

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


def fuse_residual_adds(block: TransformerBlock) -> int:
    """Gives each residual add of ``block``'s layers to the norm that reads its sum next, where
    that applies (module docstring); returns how many adds it gave."""
    layers, config = list(block.layers), block.config
    across_layers = (config.recompute_granularity != "full" and not config.cpu_offloading
                     and getattr(config, "cuda_graph_impl", "none") == "none"
                     and not config.enable_cuda_graph)
    given = 0
    for layer, reader in zip(layers, layers[1:] + [None]):
        # the norm that reads the MLP's sum: the next layer's input norm, or the final norm
        next_norm = (getattr(block, "final_layernorm", None) if reader is None
                     else reader.input_layernorm)
        if _takes_hand_over(layer.pre_mlp_layernorm, layer.recompute_pre_mlp_layernorm, layer):
            layer.self_attn_bda = ResidualThenNorm(layer.pre_mlp_layernorm)
            given += 1
        recomputed = reader is not None and reader.recompute_input_layernorm
        if across_layers and _takes_hand_over(next_norm, recomputed, layer, reader):
            layer.mlp_bda = ResidualThenNorm(next_norm)
            given += 1
    return given


def _takes_hand_over(norm, recomputed: bool, *layers) -> bool:
    """Whether megatron calls ``norm`` on the sum itself: a compiled norm, not wrapped in a
    recompute (selective ``layernorm``), and no activation offload in ``layers`` (the one that
    adds, the one that normalises), which could put another tensor in the sum's place."""
    offloaded = any(getattr(layer, "offload_attn_norm", False)
                    or getattr(layer, "offload_mlp_norm", False) for layer in layers)
    return isinstance(norm, (CompiledRMSNorm, CompiledLayerNorm)) and not recomputed \
        and not offloaded
