"""megatron-core 0.16's selective recompute of "layernorm" and "mlp" without Transformer Engine.

``--recompute-granularity selective --recompute-modules layernorm mlp`` (Megatron-LM's flags)
keeps a layer's MLP activations and its norms' outputs out of memory until the backward pass.
Without TE, megatron 0.16 breaks on both, found on the CPU with the tiny model:

1. "layernorm": ``TransformerLayer`` builds ``CheckpointWithoutOutput()``, whose default
   ``fp8=False`` becomes ``self.fp8 = fp8 is not None``, i.e. True, and the forward then calls
   TE's ``FP8GlobalStateManager`` -> ``NameError``. Without TE there is no FP8: we build the
   checkpoint with FP8 off.
2. "mlp" on a layer whose MLP has biases (the vision tower's): the MLP returns its fc2 bias
   parameter for the fused bias-dropout-add, and ``tensor_parallel.checkpoint`` hands it out of
   its autograd function, which makes the parameter an output of the checkpoint node. In the
   backward the recomputed MLP returns the same parameter again, and differentiating it re-enters
   the node being run: endless recursion until memory runs out. A parameter needs no
   recomputation, so ours returns parameters around the checkpoint instead of through it; the
   bias-dropout-add then sends the bias gradient straight to the parameter, as without
   recompute.

``apply()`` is idempotent; it changes nothing where TE is installed (megatron's own path).
"""
from __future__ import annotations

import importlib

import torch

_APPLIED = False


def _checkpoint_without_fp8(original_init):
    def __init__(self, fp8=None):
        original_init(self, fp8)
        self.fp8 = False  # no TE, no FP8 state to save or restore

    return __init__


def _parameters_around(checkpoint):
    def checkpoint_keeping_parameters_out(function, distribute_saved_activations, *args):
        parameters = {}

        def without_parameters(*inputs):
            outputs = function(*inputs)
            if not isinstance(outputs, tuple):
                return outputs
            parameters.update({index: output for index, output in enumerate(outputs)
                               if isinstance(output, torch.nn.Parameter)})
            return tuple(None if index in parameters else output
                         for index, output in enumerate(outputs))

        outputs = checkpoint(without_parameters, distribute_saved_activations, *args)
        if not parameters:
            return outputs
        return tuple(parameters.get(index, output) for index, output in enumerate(outputs))

    return checkpoint_keeping_parameters_out


def apply() -> None:
    """Patch megatron's two checkpoint helpers as the transformer layer reaches them."""
    global _APPLIED
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    if _APPLIED or hasattr(random, "FP8GlobalStateManager"):  # TE present: megatron's own path
        return
    tensor_parallel = importlib.import_module("megatron.core.tensor_parallel")
    random.CheckpointWithoutOutput.__init__ = _checkpoint_without_fp8(
        random.CheckpointWithoutOutput.__init__)
    # transformer_layer calls tensor_parallel.checkpoint(...) through the package at run time
    tensor_parallel.checkpoint = _parameters_around(random.checkpoint)
    _APPLIED = True
