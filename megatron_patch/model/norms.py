"""The local spec's norm: torch's LayerNorm / RMSNorm, usable under sequence parallelism.

megatron-core's ``WrappedTorchNorm`` (what its local spec uses without APEX) refuses
``sequence_parallel``. Under sequence parallelism each tensor-parallel rank normalises only its
slice of the sequence, so a norm's weight gradient on one rank covers only those tokens; megatron's
``finalize_model_grads`` sums such gradients over the TP group for every parameter marked
``sequence_parallel`` (as its own APEX and Transformer Engine norms mark theirs). This norm is
torch's, marked the same way, so the local spec runs with ``--sequence-parallel`` on any device.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class TorchNorm:
    """``build_module`` target with megatron's norm signature; returns the torch module."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization not in _NORMS:
            raise ValueError(f"normalization {config.normalization!r} is not one of {sorted(_NORMS)}")
        norm = _NORMS[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
