"""Read model tensors out of a megatron dist-checkpoint, a few at a time, whatever TP/PP wrote it.

A dist-checkpoint (torch DCP format underneath) stores each *global* tensor as chunks: one per
TP rank, per SwiGLU half, per layer (decoder layers are stacked along a leading layer axis,
``language_model.decoder.layers.mlp.linear_fc1.weight`` is ``[layers, 2*ffn, hidden]``). Which
chunks exist depends on the TP/PP of the run that saved it; the global tensor does not. So we ask
DCP for "layer i of global tensor K" and it reads and stitches exactly the chunks that cover it --
the same resharding the trainer's load does, but one layer at a time instead of the whole model,
and without the optimizer state (which can be twice the model).

Which global key and layer a parameter lives at is taken from the model's own
``sharded_state_dict()`` (built on the meta device), so the mapping is megatron's, not ours.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_patch.checkpoint_conversion.errors import raise_if_problems


@dataclass(frozen=True)
class Location:
    """Where one model parameter lives in a dist-checkpoint."""
    key: str                  # global ShardedTensor key
    layer: Optional[int]      # index along the stacked layer axis, None for unstacked tensors
    shape: Tuple[int, ...]    # the parameter's (unsharded) shape


def checkpoint_layout(model: torch.nn.Module) -> Dict[str, Location]:
    """Parameter name -> location, from a TP=1/PP=1 model's ``sharded_state_dict()``."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    params = dict(model.named_parameters())
    layout: Dict[str, Location] = {}
    for name, entry in model.sharded_state_dict().items():
        if name not in params:
            continue  # _extra_state objects and buffers
        if isinstance(entry, ShardedTensorFactory):  # SwiGLU fc1: two halves of the same key
            entry = entry.build()[0]
        assert isinstance(entry, ShardedTensor), (name, type(entry))
        layer = entry.global_offset[0] if entry.prepend_axis_num else None
        layout[name] = Location(entry.key, layer, tuple(params[name].shape))
    return layout


class _SlicePlanner(DefaultLoadPlanner):
    """Loads chosen slices of checkpoint tensors into given destination tensors."""

    def __init__(self, requests: List[Tuple[str, Tuple[int, ...], torch.Tensor]]):
        super().__init__()
        self.requests = requests
        self.destinations: Dict[Tuple[str, torch.Size], torch.Tensor] = {}

    def create_local_plan(self) -> LoadPlan:
        read_items = []
        for key, offsets, destination in self.requests:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=destination.shape)
            self.destinations[(key, chunk.offsets)] = destination
            read_items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(read_items)

    def resolve_tensor(self, read_item):
        destination = self.destinations[(read_item.dest_index.fqn, read_item.dest_index.offset)]
        return narrow_tensor_by_index(destination, read_item.dest_offsets, read_item.lengths)


class CheckpointReader:
    """The model tensors of one ``iter_*`` dist-checkpoint directory."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir
        metadata = FileSystemReader(checkpoint_dir).read_metadata()
        self.tensors: Dict[str, TensorStorageMetadata] = {
            key: md for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}

    def model_keys(self) -> List[str]:
        return sorted(key for key in self.tensors if not key.startswith("optimizer."))

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def validate(self, layout: Dict[str, Location], what: str) -> None:
        """Every parameter present with its shape, and no model tensor the config does not know."""
        expected: Dict[str, Tuple[int, ...]] = {}
        for loc in layout.values():
            if loc.layer is None:
                expected[loc.key] = loc.shape
            else:
                layers = max(expected.get(loc.key, (0,))[0], loc.layer + 1)
                expected[loc.key] = (layers,) + loc.shape
        missing = [key for key in expected if key not in self.tensors]
        mismatched = [f"{key}: checkpoint {tuple(self.tensors[key].size)}, {what} expects {shape}"
                      for key, shape in expected.items()
                      if key in self.tensors and tuple(self.tensors[key].size) != shape]
        unexpected = [key for key in self.model_keys() if key not in expected]
        raise_if_problems(f"{self.checkpoint_dir} does not hold the weights of {what}",
                          [("missing tensors", missing), ("shape mismatches", mismatched),
                           ("unexpected tensors", unexpected)])

    def read(self, wanted: Iterable[Tuple[str, Location]]) -> Dict[str, torch.Tensor]:
        """name -> full (unsharded) tensor, in the checkpoint's dtype."""
        out, requests = {}, []
        for name, loc in wanted:
            meta = self.tensors[loc.key]
            if loc.layer is None:
                destination = torch.empty(loc.shape, dtype=meta.properties.dtype)
                requests.append((loc.key, (0,) * len(loc.shape), destination))
                out[name] = destination
            else:
                destination = torch.empty((1,) + loc.shape, dtype=meta.properties.dtype)
                requests.append((loc.key, (loc.layer,) + (0,) * len(loc.shape), destination))
                out[name] = destination[0]
        if requests:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({}, storage_reader=FileSystemReader(self.checkpoint_dir),
                         planner=_SlicePlanner(requests), no_dist=True)
        return out
