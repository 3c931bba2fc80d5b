"""megatron's tensor-parallel linears without the host cost of their communication regions at TP 1.

Every ``ColumnParallelLinear`` forward passes its input through
``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), and every
``RowParallelLinear`` its output through ``reduce_from_tensor_model_parallel_region`` (all-reduce
forward, identity backward). With one rank in the group both are identities, but each is still an
autograd Function: a Python forward, a node in the graph and a Python backward, for nothing.
``RowParallelLinear`` also hands its matmul ``tp_group=None``, which megatron's
``get_tensor_model_parallel_group_if_none`` answers with the default group after a
``warnings.warn(DeprecationWarning)`` on every call (filtered out, but paid for).

That is host time, which bounds the GPU step where the host cannot launch kernels as fast as the
device runs them (docs/BENCHMARKS.md, "The host's own time per step"). A ColumnParallel +
RowParallel pair (width 64, CPU) took 238 us forward and backward as megatron runs it, 224 us
without the warning and 200 us without the regions either. The trainer's step of the GPU
benchmark's model at negligible widths (benchmarks/bench_host_time.py's, seq 256, steps with and
without the shortcuts alternated in one process): 41-78 ms less of 1.46-1.57 s, 3-5%.

:func:`apply` replaces those three names in megatron's ``tensor_parallel.layers`` (the module
whose linears call them), so nothing else changes: with a group of two or more ranks, or
without an initialised process group, megatron's own functions run; with one rank the value is
the input itself, as megatron's identity returns it (the arithmetic is the same, bit for bit).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import layers

_APPLIED = False
# megatron's own functions (what runs for a group of several ranks)
MEGATRON_COPY_TO = layers.copy_to_tensor_model_parallel_region
MEGATRON_REDUCE_FROM = layers.reduce_from_tensor_model_parallel_region
MEGATRON_GROUP_IF_NONE = layers.get_tensor_model_parallel_group_if_none


def group_if_none(tp_group, is_expert=False, check_initialized=True):
    """megatron's ``get_tensor_model_parallel_group_if_none`` without its deprecation warning:
    the given group, else the default (expert) tensor-parallel group."""
    if (tp_group is not None or not torch.distributed.is_initialized()
            or not parallel_state.is_initialized()):
        return MEGATRON_GROUP_IF_NONE(tp_group, is_expert, check_initialized)
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


def _single_rank(group) -> bool:
    group = group_if_none(group)
    return group is not None and group.size() == 1


def copy_to_tensor_model_parallel_region(input_, group=None):
    """Identity on one rank; megatron's copy (all-reduce of the gradient) otherwise."""
    if _single_rank(group):
        return input_
    return MEGATRON_COPY_TO(input_, group)


def reduce_from_tensor_model_parallel_region(input_, group=None):
    """Identity on one rank; megatron's all-reduce otherwise."""
    if _single_rank(group):
        return input_
    return MEGATRON_REDUCE_FROM(input_, group)


def apply() -> None:
    """Install the shortcuts in megatron's tensor-parallel linears (once)."""
    global _APPLIED
    if _APPLIED:
        return
    layers.copy_to_tensor_model_parallel_region = copy_to_tensor_model_parallel_region
    layers.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region
    layers.get_tensor_model_parallel_group_if_none = group_if_none
    _APPLIED = True
