"""Blends: an energon metadataset (a .yaml) that mixes converted dataset folders by weight.

energon reads the blend itself when training; the launcher's plan (samples, packing estimate)
and the tools' messages only need to know which dataset folders a split draws from, and how
much of each.
"""
import os
from typing import List, Tuple

import yaml


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


def member_folders(path: str) -> List[str]:
    """Every dataset path the blend names, in any split, each once."""
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    splits = (config.get("splits") or {}) if isinstance(config, dict) else {}
    return list(dict.fromkeys(member for split in splits
                              for member, _ in blend_members(path, split)))
