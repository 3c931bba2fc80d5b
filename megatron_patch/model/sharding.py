"""Load a full (unsharded, TP=1/PP=1-named) megatron state dict into this rank's model shard.

Used to put *the same weights* into models built at different TP/PP (tests, and the HF
converter's simplest path: HF -> :func:`hf_mapping.hf_to_mcore` -> this). Rules:

* tensor-parallel params (megatron marks them ``tensor_model_parallel`` with a
  ``partition_dim``) take this TP rank's contiguous chunk -- right for vocab rows, column- and
  row-parallel linears, and for ``linear_qkv`` because megatron groups its rows per query group;
* SwiGLU ``linear_fc1`` holds ``[gate; up]``: each rank takes its chunk of gate *and* of up;
* pipeline stages: module-local decoder layer ``i`` is global layer ``layer_number - 1``;
* TE-spec models read the local-spec names of their fused pre-norms.
"""
from __future__ import annotations

import re
from typing import Dict

import torch
from megatron.core import parallel_state

_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)(\..*)$")
# TE fuses the pre-norms into the next linear; the full state dict uses local-spec names
_TE_TO_LOCAL = (("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
                ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."))


def _local_name(name: str) -> str:
    for te, local in _TE_TO_LOCAL:
        if te in name:
            return name.replace(te, local)
    return name


def _global_name(model: torch.nn.Module, name: str) -> str:
    m = _LAYER.match(name)
    if not m:
        return name
    layer = model.language_model.decoder.layers[int(m.group(2))]
    return f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"


def shard_tensor(full: torch.Tensor, param: torch.Tensor, name: str, rank: int, size: int) -> torch.Tensor:
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.startswith("language_model.") and name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy this rank's slice of every parameter from ``full`` (names as at TP=1, PP=1)."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    missing = []
    for name, param in model.named_parameters():
        gname = _local_name(_global_name(model, name))
        if gname not in full:
            missing.append(gname)
            continue
        part = shard_tensor(full[gname], param, gname, rank, size)
        if part.shape != param.shape:
            raise ValueError(f"{name}: shard {tuple(part.shape)} != param {tuple(param.shape)}")
        param.copy_(part)
    if strict and missing:
        raise KeyError(f"missing from the full state dict: {missing[:5]}{'...' if len(missing) > 5 else ''}")


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of a TP=1, PP=1 model's parameters (the format :func:`load_full_state_dict` reads)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
