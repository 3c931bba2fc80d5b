"""Writing samples into rolling WebDataset tar shards, one series per split, in a staging folder.

Shards are first written under `<output>/.staging/` and only moved to their final names
(`subtaskdata-00000.tar` ...; train first, then val, then test) once every sample is written, so a
run that dies never leaves a half-written shard where the index could point at it. Splits get
separate shards because energon assigns splits per tar, not per sample.

A conversion of millions of samples runs for hours, so the writer can also stop and go on:
`commit()` flushes every open shard to disk and returns the writer's state (each open shard's
length at a sample boundary), and a writer built with that state truncates the open shards to
those lengths and appends to them. Members are named, ordered and owned as webdataset's
TarWriter writes them, but with tarfile's seekable mode: TarWriter streams through a buffer it
does not flush, so a shard's length on disk never marks a sample boundary. (Its float mtime of
0.0 also cost a 1 KB PAX header per member; an integer 0 needs none.)
"""
import io
import os
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_patch.data.shard_format import SHARD_PATTERN, SPLITS

STAGING_DIR = ".staging"
_FIXED_MTIME = 0  # reproducible tars: the same input gives byte-identical shards
_OWNER, _MODE = "bigdata", 0o444  # what webdataset's TarWriter writes


@dataclass
class ShardInfo:
    name: str
    split: str
    samples: int = 0
    bytes: int = 0


class _ShardTar:
    """One shard open for appending samples; `flush` returns its length, a sample boundary."""

    def __init__(self, path: str, resume_at: Optional[int] = None):
        if resume_at is None:
            self.file = open(path, "wb")
        else:
            self.file = open(path, "r+b")
            self.file.truncate(resume_at)
            self.file.seek(resume_at)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)

    def write(self, key: str, parts: dict) -> None:
        for part in sorted(parts):
            data = parts[part]
            member = tarfile.TarInfo(f"{key}.{part}")
            member.size, member.mtime, member.mode = len(data), _FIXED_MTIME, _MODE
            member.uname = member.gname = _OWNER
            self.tar.addfile(member, io.BytesIO(data))

    def flush(self) -> int:
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.tar.offset

    def close(self) -> None:
        self.tar.close()  # the end-of-archive blocks
        self.file.close()


@dataclass
class _OpenShard:
    info: ShardInfo
    path: str
    tar: _ShardTar


@dataclass
class SplitShardWriter:
    """Rolls to a new shard of a split before a sample would push it past `max_samples` or
    `max_bytes` (a single sample larger than `max_bytes` gets a shard of its own). With
    `resume_from` (a `commit()` result) it goes on from that commit instead of starting empty."""
    output_dir: str
    max_samples: int
    max_bytes: int
    resume_from: Optional[dict] = None
    _open: dict = field(default_factory=dict)
    _closed: dict = field(default_factory=lambda: {split: [] for split in SPLITS})

    def __post_init__(self):
        self.staging = os.path.join(self.output_dir, STAGING_DIR)
        if self.resume_from is None:
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging)
        else:
            self._restore(self.resume_from)

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
        shard.tar.write(key, parts)
        shard.info.samples += 1
        shard.info.bytes += size

    def commit(self) -> dict:
        """Flushes the open shards to disk; returns the state a resumed writer starts from."""
        return {"closed": {split: [asdict(info) for info in infos]
                           for split, infos in self._closed.items()},
                "open": {split: {**asdict(shard.info), "length": shard.tar.flush()}
                         for split, shard in self._open.items()}}

    def _restore(self, state: dict) -> None:
        """Back to the state of a commit: shards opened after it are removed, open ones are cut
        back to their committed length (a closed one may have been closed after the commit)."""
        self._closed = {split: [ShardInfo(**info) for info in state["closed"][split]]
                        for split in SPLITS}
        kept = {info.name for infos in self._closed.values() for info in infos}
        for split, shard in state["open"].items():
            info = ShardInfo(**{k: v for k, v in shard.items() if k != "length"})
            path = os.path.join(self.staging, info.name)
            self._open[split] = _OpenShard(info, path, _ShardTar(path, resume_at=shard["length"]))
            kept.add(info.name)
        for name in os.listdir(self.staging):
            if name.endswith(".tar") and name not in kept:
                os.remove(os.path.join(self.staging, name))

    def _start(self, split: str) -> _OpenShard:
        name = f"{split}-{len(self._closed[split]):05d}.tar"
        path = os.path.join(self.staging, name)
        self._open[split] = _OpenShard(ShardInfo(name, split), path, _ShardTar(path))
        return self._open[split]

    def _close(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.tar.close()
        shard.info.bytes = os.path.getsize(shard.path)
        self._closed[split].append(shard.info)

    def close_all(self) -> None:
        for split in list(self._open):
            self._close(split)

    def publish(self, prefix: str) -> list:
        """Moves the closed shards to their final names (train first, then val, then test) and
        returns their ShardInfos; a shard moved by an earlier, interrupted call is left as it
        is. The staging folder stays (it holds the resume point) until `remove_staging`."""
        assert not self._open, "close_all() first"
        published = []
        for split in SPLITS:
            for info in self._closed[split]:
                final = SHARD_PATTERN.format(prefix=prefix, index=len(published))
                staged = os.path.join(self.staging, info.name)
                if os.path.exists(staged):
                    os.replace(staged, os.path.join(self.output_dir, final))
                elif not os.path.exists(os.path.join(self.output_dir, final)):
                    raise SystemExit(f"error: {staged} is missing (neither staged nor published "
                                     f"as {final}); add --overwrite to start over")
                published.append(ShardInfo(final, split, info.samples, info.bytes))
        return published

    def remove_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def abandon(self) -> None:
        """Closes the open files (a failing run); the staging folder stays for a resume."""
        for shard in self._open.values():
            shard.tar.file.close()
        self._open.clear()
