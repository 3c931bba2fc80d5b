"""Blends: an energon metadataset (a .yaml) that mixes converted dataset folders by weight.

energon reads the blend itself when training; the launcher's plan (samples, packing estimate)
and the tools' messages only need to know which dataset folders a split draws from, and how
much of each.
"""
import logging
import os
from typing import Any, Iterator, List, Set, Tuple

import yaml

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
