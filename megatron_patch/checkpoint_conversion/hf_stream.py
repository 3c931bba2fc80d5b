"""HF safetensors -> megatron tensors, streamed: checked against the mapping table up front, then
produced one megatron tensor at a time while the shards are read in order.

Fused tensors (q/k/v, gate/up) may have their parts in different shards; a part waits only until
its siblings arrive, then the fused tensor is handed out and every part is dropped. Peak memory
is one megatron tensor plus whatever parts are waiting -- never a whole shard, never the whole
state dict.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_patch.checkpoint_conversion.errors import raise_if_problems
from megatron_patch.checkpoint_conversion.hf_files import TensorInfo, read_tensors, scan
from megatron_patch.model import hf_mapping
from megatron_patch.model.configs import LlavaOVConfig


@dataclass
class HFPlan:
    """What to read from which shard, and for which megatron tensor."""
    hf_dir: str
    cfg: LlavaOVConfig
    infos: Dict[str, TensorInfo]                       # on-disk name -> header info
    consumers: Dict[str, List[Tuple[hf_mapping.Item, int]]] = field(default_factory=dict)
    layout: str = "flat"
    tied: bool = False                                 # lm_head taken from the embedding
    ignored: List[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.infos[name].nbytes for name in self.consumers)

    def dominant_dtype(self) -> torch.dtype:
        weight: Dict[torch.dtype, int] = defaultdict(int)
        for name in self.consumers:
            weight[self.infos[name].dtype] += self.infos[name].nbytes
        return max(weight, key=weight.get)


def plan(hf_dir: str, cfg: LlavaOVConfig, mcore_shapes: Dict[str, Sequence[int]],
         tie_word_embeddings: bool = False) -> HFPlan:
    """Checks every HF tensor name and shape against the table; raises naming all problems."""
    infos = scan(hf_dir)
    result = HFPlan(hf_dir, cfg, infos, layout=hf_mapping.detect_hf_layout(infos))
    flat_to_disk: Dict[str, str] = {}
    duplicated = []
    for disk in infos:
        flat = hf_mapping.normalize_hf_name(disk)
        if hf_mapping.is_ignored_hf(flat):
            result.ignored.append(disk)
        elif flat in flat_to_disk:
            duplicated.append(f"{disk} and {flat_to_disk[flat]} are the same tensor")
        else:
            flat_to_disk[flat] = disk
    by_hf = {}
    for item in hf_mapping.items(cfg):
        for index, name in enumerate(item.hf):
            by_hf[name] = (item, index)
    if "lm_head.weight" not in flat_to_disk and "model.embed_tokens.weight" in flat_to_disk \
            and tie_word_embeddings:
        result.tied = True
    missing, mismatched = [], []
    for item in hf_mapping.items(cfg):
        expected = hf_mapping.hf_shapes(item, mcore_shapes[item.mcore], cfg)
        for index, name in enumerate(item.hf):
            source = "model.embed_tokens.weight" if (result.tied and name == "lm_head.weight") else name
            if source not in flat_to_disk:
                missing.append(f"{name} (for {item.mcore})")
                continue
            disk = flat_to_disk[source]
            result.consumers.setdefault(disk, []).append((item, index))
            if infos[disk].shape != expected[index]:
                mismatched.append(f"{disk}: checkpoint {infos[disk].shape}, model {cfg.name} "
                                  f"expects {expected[index]} (for {item.mcore})")
    unexpected = [disk for flat, disk in flat_to_disk.items() if flat not in by_hf]
    raise_if_problems(f"{hf_dir} does not hold the weights of model {cfg.name}",
                      [("missing tensors", missing), ("unexpected tensors", sorted(unexpected)),
                       ("shape mismatches", mismatched), ("duplicated tensors", duplicated)])
    return result


def stream(hf_plan: HFPlan, on_bytes: Optional[Callable[[int], None]] = None
           ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(megatron name, tensor) for every megatron tensor, reading shard by shard."""
    cfg, waiting = hf_plan.cfg, defaultdict(dict)
    by_file: Dict[str, List[str]] = defaultdict(list)
    for disk in hf_plan.consumers:
        by_file[hf_plan.infos[disk].file].append(disk)
    for file in sorted(by_file):
        wanted = sorted(((disk, hf_plan.infos[disk]) for disk in by_file[file]), key=lambda x: x[1].begin)
        for disk, tensor in read_tensors(hf_plan.hf_dir, wanted):
            if on_bytes:
                on_bytes(hf_plan.infos[disk].nbytes)
            for item, index in hf_plan.consumers[disk]:
                parts = waiting[item.mcore]
                parts[index] = tensor
                if len(parts) == len(item.hf):
                    del waiting[item.mcore]
                    ordered = [parts[i] for i in range(len(item.hf))]
                    yield item.mcore, hf_mapping.fuse_to_mcore(item, ordered, cfg)
            del tensor
    assert not waiting, f"incomplete fused tensors: {sorted(waiting)}"  # plan() guarantees this
