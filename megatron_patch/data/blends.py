"""Blends: an energon metadataset (a .yaml) that mixes converted dataset folders by weight.

energon reads the blend itself when training; the launcher's plan (samples, packing estimate)
and the tools' messages only need to know which dataset folders a split draws from, and how
much of each.
"""
import hashlib
import json
import logging
import os
from typing import Any, Iterator, List, Optional, Set, Tuple

import yaml

from megatron_patch.data.energon_index import META_DIR

logger = logging.getLogger(__name__)


def is_blend(path: str) -> bool:
    return os.path.isfile(path) and path.endswith((".yaml", ".yml"))


def blend_members(path: str, split: str = "train") -> List[Tuple[str, float]]:
    """(dataset path, weight) of each member `split` draws from, paths resolved as energon
    resolves them (relative to the yaml's folder); [] when the blend has no such split."""
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    part = (config.get("splits") or {}).get(split) if isinstance(config, dict) else None
    if not part:
        return []
    entries = part.get("blend") or [part]
    base = os.path.dirname(os.path.abspath(path))
    return [(os.path.normpath(os.path.join(base, entry["path"])), float(entry.get("weight", 1.0)))
            for entry in entries]


def train_data_fingerprint(path: str) -> Optional[dict]:
    """What a train loader's saved position refers to: each folder's train shards with their
    sample counts, and the blend's weights; not the paths (a moved dataset is the same data).
    None when a folder has no energon index to read the counts from."""
    from megatron_patch.data.shard_scan import read_split_layout  # imports energon: seconds
    parts = []
    for folder, weight in _weighted_folders(path, 1.0):
        info = os.path.join(folder, META_DIR, ".info.json")
        try:
            with open(info) as handle:
                counts = json.load(handle)["shard_counts"]
        except (OSError, ValueError, KeyError):
            return None
        shards = read_split_layout(folder).get("train", [])
        parts.append((weight, [(name, counts.get(name)) for name in shards]))
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return {"train_samples": sum(n or 0 for _, shards in parts for _, n in shards),
            "train_shards": sum(len(shards) for _, shards in parts), "digest": digest}


def _weighted_folders(path: str, weight: float) -> Iterator[Tuple[str, float]]:
    if not is_blend(path):
        yield os.path.normpath(path), weight
        return
    for member, share in blend_members(path):
        yield from _weighted_folders(member, weight * share)


def dataset_folders(path: str) -> List[str]:
    """The dataset folders `path` stands for: itself unless it is a blend, else every path a
    blend names under a `path:` key, in any split, following nested blends; each once. A
    blend that cannot be read is skipped with a warning."""
    folders: List[str] = []
    _collect_folders(path, set(), folders)
    return folders


def _collect_folders(path: str, seen: Set[str], folders: List[str]) -> None:
    real = os.path.realpath(path)
    if real in seen:
        return
    seen.add(real)
    if not is_blend(path):
        folders.append(os.path.normpath(path))  # a dataset folder (named even if missing)
    else:
        try:
            with open(path) as handle:
                config = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError) as error:
            logger.warning("cannot read the blend %s (%s); its datasets are not checked", path,
                           error)
            return
        base = os.path.dirname(os.path.abspath(path))
        for entry in _yaml_paths(config):
            _collect_folders(os.path.join(base, entry), seen, folders)


def _yaml_paths(node: Any) -> Iterator[str]:
    """Every string under a `path` key of a (nested) metadataset yaml."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "path" and isinstance(value, str):
                yield value
            else:
                yield from _yaml_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from _yaml_paths(item)
