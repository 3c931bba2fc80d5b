"""The vision tower's fc1 bias and exact GELU as one compiled kernel on a GPU.

megatron-core fuses a bias with GELU only in the tanh approximation (``bias_gelu_impl``, under
``bias_activation_fusion``), not the exact (erf) GELU RICE-ViT was trained with. So its MLP adds
the bias in one kernel and applies GELU in another, and in the backward reduces the bias's
gradient and differentiates GELU separately: two launches each way per vision layer, each
reading and writing the whole ``[patches, ffn]`` activation.

:func:`apply` makes megatron's ``MLP.forward`` compute ``gelu(fc1(x) + bias)`` with
``torch.compile`` instead (one kernel forward; the backward's GELU derivative and bias reduction
compiled together) for an MLP whose config has ``compiled_bias_gelu`` set (the vision tower's,
with the fused kernels: ``--no-bias-swiglu-fusion`` turns it off) and whose input is on a GPU.
It keeps what megatron's keeps for the backward (one ``[patches, ffn]`` tensor) and computes in
fp32, rounding once, as torch's GELU kernel does. Every other MLP and call (the CPU, gated MLPs,
other activations) runs megatron's forward unchanged.

A patch rather than an ``MLP`` subclass in the layer spec: megatron's ``TransformerLayer`` hands
its tensor-parallel group only to the ``MLP`` class itself (a subclass gets a warning and the
deprecated default group).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

_APPLIED = False


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


@functools.lru_cache(maxsize=None)
def compiled_bias_gelu():
    """:func:`bias_gelu` through ``torch.compile``, dynamic in the token count (the vision
    tower's images vary)."""
    return torch.compile(bias_gelu, dynamic=True)


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


def fused_activation_applies(mlp: MLP, hidden_states, per_token_scale) -> bool:
    config = mlp.config
    return (getattr(config, "compiled_bias_gelu", False) and _on_gpu(hidden_states)
            and per_token_scale is None and mlp.activation_func is F.gelu
            and config.add_bias_linear and not config.gated_linear_unit
            and not config.bias_activation_fusion and not config.use_te_activation_func)


def with_compiled_bias_gelu(original):
    """megatron's ``MLP.forward`` with the fused path above."""

    @functools.wraps(original)
    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not fused_activation_applies(self, hidden_states, per_token_scale):
            return original(self, hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        return self.linear_fc2(compiled_bias_gelu()(intermediate, bias))

    return forward


def apply() -> None:
    """Install the fused path in megatron's MLP (once)."""
    global _APPLIED
    if _APPLIED:
        return
    MLP.forward = with_compiled_bias_gelu(MLP.forward)
    _APPLIED = True
