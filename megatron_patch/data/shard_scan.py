"""Reading a converted dataset directly from its files, for inspection and validation.

Why not only through energon: energon stops at a truncated tar, skips bad samples with a log line,
and does not notice tars changed after `prepare`. The inspector must instead name *every* bad
shard and sample, so it reads the split list, our manifest, energon's `.tar.idx` files and the
tars themselves, and turns each finding into a `Problem` instead of an exception.
"""
import json
import os
import struct
import tarfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import braceexpand
import yaml
from megatron.energon.flavors.webdataset.config import split_name_re

from megatron_patch.data.energon_index import META_DIR
from megatron_patch.data.shard_format import MANIFEST_NAME

SPLIT_YAML = "split.yaml"
IDX_SUFFIX = ".idx"          # energon writes `<shard>.tar.idx`: uint64 sample offsets + end
UNINDEXED = "unindexed"      # the pseudo split of tars found without a .nv-meta/split.yaml


@dataclass(frozen=True)
class Problem:
    """One finding; `shard` and `key` say where (either may be empty)."""
    shard: str
    key: str
    message: str

    def __str__(self) -> str:
        where = ":".join(p for p in (self.shard, self.key) if p) or "dataset"
        return f"{where}: {self.message}"


@dataclass
class ShardSample:
    """The raw parts of one sample, as energon groups them (key = name up to the first dot)."""
    shard: str
    key: str
    parts: Dict[str, bytes]


def read_split_layout(dataset_dir: str) -> Dict[str, List[str]]:
    """{split: [shard names]} from `.nv-meta/split.yaml`, read as energon reads it (prepare
    brace-collapses runs of names, e.g. `subtaskdata-{00000..00005}.tar`, and `exclude` drops
    shards); without a split.yaml, every tar as the pseudo split `unindexed`."""
    path = os.path.join(dataset_dir, META_DIR, SPLIT_YAML)
    if not os.path.isfile(path):
        tars = sorted(n for n in os.listdir(dataset_dir) if n.endswith(".tar"))
        return {UNINDEXED: tars}
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    excluded = {name for pattern in config.get("exclude") or ()
                for name in braceexpand.braceexpand(pattern)}
    return {split: [name for pattern in patterns or () for name in braceexpand.braceexpand(pattern)
                    if name not in excluded]
            for split, patterns in (config.get("split_parts") or {}).items()}


def load_manifest(dataset_dir: str) -> Optional[dict]:
    path = os.path.join(dataset_dir, META_DIR, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def idx_sample_count(tar_path: str) -> Optional[int]:
    """Samples recorded in energon's `.tar.idx` (None if absent)."""
    offsets = _idx_offsets(tar_path)
    return None if offsets is None else max(0, len(offsets) - 1)


def _idx_offsets(tar_path: str) -> Optional[List[int]]:
    path = tar_path + IDX_SUFFIX
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        data = handle.read()
    return list(struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 8 * 8]))


def check_shard_files(dataset_dir: str, layout: Dict[str, List[str]],
                      manifest: Optional[dict]) -> List[Problem]:
    """File-level checks, no tar reading: index present, tars present, sizes and counts as the
    converter's manifest recorded them (energon itself does not notice changed tars)."""
    problems = []
    if UNINDEXED in layout:
        problems.append(Problem("", "", f"no {META_DIR}/{SPLIT_YAML}: not an energon dataset "
                                        "(was the conversion interrupted?)"))
    if manifest is None:
        problems.append(Problem("", "", f"no {META_DIR}/{MANIFEST_NAME}: cannot check that the "
                                        "tars are the ones the converter wrote"))
    listed = {name: split for split, names in layout.items() for name in names}
    recorded = (manifest or {}).get("shards", {})
    for name, split in listed.items():
        problems += [Problem(name, "", message) for message in
                     _shard_file_faults(os.path.join(dataset_dir, name), split,
                                        recorded.get(name), manifest is not None)]
    for name in sorted(set(recorded) - set(listed)):
        problems.append(Problem(name, "", "in the manifest but in no split of split.yaml"))
    return problems


def _shard_file_faults(path: str, split: str, entry: Optional[dict], have_manifest: bool):
    """Messages about one listed shard: presence, index, and agreement with the manifest."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        yield f"missing tar (listed in split '{split}')"
        return
    size, offsets = os.path.getsize(path), _idx_offsets(path)
    if offsets is None:
        yield f"missing {name}{IDX_SUFFIX}: energon cannot load this shard; re-run the conversion"
    elif offsets and offsets[-1] > size:
        yield f"tar is shorter ({size} bytes) than its index says ({offsets[-1]} bytes)"
    if entry is None:
        if have_manifest:
            yield "tar is not in the manifest (added after conversion?)"
        return
    if size != entry.get("bytes"):
        yield f"size {size} bytes, manifest says {entry.get('bytes')}: tar changed after conversion"
    indexed = None if offsets is None else max(0, len(offsets) - 1)
    if indexed is not None and indexed != entry.get("samples"):
        yield f"index has {indexed} samples, manifest says {entry.get('samples')}"
    if entry.get("split") not in (None, split):
        yield f"in split '{split}', manifest says '{entry.get('split')}'"


def iter_shard(path: str, problems: List[Problem]) -> Iterator[ShardSample]:
    """Samples of one tar in order; a read error (truncated, garbled) becomes a Problem naming
    the shard and the last good sample, and ends the shard."""
    name = os.path.basename(path)
    current: Optional[ShardSample] = None
    seen = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = split_name_re.match(member.name)
                key, part = match.groups() if match else (member.name, "")
                data = tar.extractfile(member).read()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    if key in seen:
                        problems.append(Problem(name, key, "key appears twice in the shard "
                                                           "(its parts are not contiguous)"))
                    seen.add(key)
                    current = ShardSample(name, key, {})
                if not part:
                    problems.append(Problem(name, key, f"member {member.name!r} has no extension"))
                current.parts[part] = data
    except (tarfile.TarError, OSError, EOFError) as error:
        after = f" after sample {current.key}" if current is not None else ""
        problems.append(Problem(name, "", f"unreadable tar{after}: {type(error).__name__}: "
                                          f"{error} (truncated or garbled)"))
        return
    if current is not None:
        yield current
