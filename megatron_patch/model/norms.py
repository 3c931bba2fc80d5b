"""The local spec's norm: torch's LayerNorm / RMSNorm, usable under sequence parallelism, and on a
GPU compiled into fused kernels.

megatron-core's ``WrappedTorchNorm`` (what its local spec uses without APEX) refuses
``sequence_parallel``. Under sequence parallelism each tensor-parallel rank normalises only its
slice of the sequence, so a norm's weight gradient on one rank covers only those tokens; megatron's
``finalize_model_grads`` sums such gradients over the TP group for every parameter marked
``sequence_parallel`` (as its own APEX and Transformer Engine norms mark theirs). This norm is
torch's, marked the same way, so the local spec runs with ``--sequence-parallel`` on any device.

With ``config.compiled_norm`` (build_model's ``norm_fusion``, on with CUDA unless
``--no-norm-fusion``) a CUDA input goes through ``torch.compile`` of the same functional norm.
The one H200 profile (2026-12-04, docs/BENCHMARKS.md) spent 0.15 s of a step's 2.4 s of kernels
in torch's RMSNorm: its backward averaged 124 us where reading and writing the tensors takes
~25 us (the weight gradient's reduction over 131k rows of the per-head q/k norms is the slow
part), and the vision tower's LayerNorm backward another 0.1 s. Inductor generates one fused
kernel each way plus a split reduction for the weight gradient. It computes in fp32 and rounds
once, as torch's kernels do, but not in the same order, so the CPU keeps torch's kernels (the
demo's trajectory is measured with them). The parameters and their names are torch's.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@functools.lru_cache(maxsize=None)
def compiled(function):
    """``function`` through ``torch.compile``, built on first use with dynamic shapes: one
    kernel serves the hidden states, the per-head queries and keys and the vision tower's
    varying token counts, instead of a recompilation for each (torch stops compiling a function
    after 8 and runs it eagerly)."""
    return torch.compile(function, dynamic=True)


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda


class _HandedOver:
    """A norm that can be given its output in advance: model/residual_norm.py computes the
    residual sum and its norm in one kernel, and hands the result to the norm that megatron's
    layer calls on that sum next. Held for that one call only."""

    _handed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def hand_over(self, source: torch.Tensor, output: torch.Tensor) -> None:
        self._handed = (source, output)

    def _take_handed(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        handed, self._handed = self._handed, None
        return handed[1] if handed is not None and handed[0] is x else None


class CompiledRMSNorm(_HandedOver, torch.nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handed = self._take_handed(x)
        if handed is not None:
            return handed
        if not _on_gpu(x):
            return super().forward(x)
        return compiled(rms_norm)(x, self.weight, self.eps)


class CompiledLayerNorm(_HandedOver, torch.nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        handed = self._take_handed(x)
        if handed is not None:
            return handed
        if not _on_gpu(x):
            return super().forward(x)
        return compiled(layer_norm)(x, self.weight, self.bias, self.eps)


_NORMS = {"LayerNorm": (torch.nn.LayerNorm, CompiledLayerNorm),
          "RMSNorm": (torch.nn.RMSNorm, CompiledRMSNorm)}


class TorchNorm:
    """``build_module`` target with megatron's norm signature; returns the torch module."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization not in _NORMS:
            raise ValueError(f"normalization {config.normalization!r} is not one of {sorted(_NORMS)}")
        plain, fused = _NORMS[config.normalization]
        norm = (fused if getattr(config, "compiled_norm", False) else plain)(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
