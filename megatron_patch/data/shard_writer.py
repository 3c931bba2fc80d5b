"""Writing samples into rolling WebDataset tar shards, one series per split, in a staging folder.

Shards are first written under `<output>/.staging/` and only moved to their final names
(`subtaskdata-00000.tar` ...; train first, then val, then test) once every sample is written, so a
run that dies never leaves a half-written shard where the index could point at it. Splits get
separate shards because energon assigns splits per tar, not per sample.
"""
import os
import shutil
from dataclasses import dataclass, field

import webdataset

from megatron_patch.data.shard_format import SHARD_PATTERN, SPLITS

STAGING_DIR = ".staging"
_FIXED_MTIME = 0.0  # reproducible tars: the same input gives byte-identical shards


@dataclass
class ShardInfo:
    name: str
    split: str
    samples: int = 0
    bytes: int = 0


@dataclass
class _OpenShard:
    info: ShardInfo
    path: str
    writer: webdataset.TarWriter


@dataclass
class SplitShardWriter:
    """Rolls to a new shard of a split before a sample would push it past `max_samples` or
    `max_bytes` (a single sample larger than `max_bytes` gets a shard of its own)."""
    output_dir: str
    max_samples: int
    max_bytes: int
    _open: dict = field(default_factory=dict)
    _closed: dict = field(default_factory=lambda: {split: [] for split in SPLITS})

    def __post_init__(self):
        self.staging = os.path.join(self.output_dir, STAGING_DIR)
        shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging)

    def write(self, split: str, key: str, parts: dict) -> None:
        # tar adds a 512-byte header per member and pads its data to 512 bytes
        size = sum(512 + -(-len(v) // 512) * 512 for v in parts.values())
        shard = self._open.get(split)
        if shard and (shard.info.samples >= self.max_samples
                      or shard.info.bytes + size > self.max_bytes):
            self._close(split)
            shard = None
        if shard is None:
            shard = self._start(split)
        shard.writer.write({"__key__": key, **parts})
        shard.info.samples += 1
        shard.info.bytes += size

    def _start(self, split: str) -> _OpenShard:
        name = f"{split}-{len(self._closed[split]):05d}.tar"
        path = os.path.join(self.staging, name)
        writer = webdataset.TarWriter(path, mtime=_FIXED_MTIME)
        self._open[split] = _OpenShard(ShardInfo(name, split), path, writer)
        return self._open[split]

    def _close(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.writer.close()
        shard.info.bytes = os.path.getsize(shard.path)
        self._closed[split].append(shard.info)

    def publish(self, prefix: str) -> list:
        """Closes every shard and moves them to their final names; returns their ShardInfos."""
        for split in list(self._open):
            self._close(split)
        published = []
        for split in SPLITS:
            for info in self._closed[split]:
                final = SHARD_PATTERN.format(prefix=prefix, index=len(published))
                os.replace(os.path.join(self.staging, info.name), os.path.join(self.output_dir, final))
                published.append(ShardInfo(final, split, info.samples, info.bytes))
        shutil.rmtree(self.staging, ignore_errors=True)
        return published

    def abandon(self) -> None:
        for shard in self._open.values():
            shard.writer.close()
        self._open.clear()
