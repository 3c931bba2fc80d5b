"""The files of a HF checkpoint directory: safetensors shards (read tensor by tensor, written
shard by shard with an index), and the side files (tokenizer, processor, chat template, custom
code) that travel with the weights.

Reading goes through the safetensors headers first (names, shapes, dtypes without touching data),
so a wrong checkpoint is refused in seconds. Tensors are then read one at a time with plain
``readinto`` into their own buffer -- not through a memory map, whose touched pages would stay
resident (and counted) until the whole shard is closed. Writing streams each tensor straight to
its file: shards are laid out up front from the known names and shapes, so a header can be
written before the data and no shard is ever buffered (``safetensors.save_file`` would hold the
shard plus a bytes copy of it).

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`` padded with
spaces to 8 bytes, then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_patch.checkpoint_conversion.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
# everything a HF checkpoint directory carries besides weights and config.json
SIDE_FILE_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "chat_template*", "preprocessor_config.json",
                      "processor_config.json", "video_preprocessor_config.json",
                      "generation_config.json", "*.py", "*.model", "*.tiktoken")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    begin: int = 0  # byte offset of the data in the file
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str) -> Dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header alone."""
    name = os.path.basename(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ConversionError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ConversionError(f"{path} has an unreadable safetensors header: {exc}") from None
    start = 8 + length
    found = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ConversionError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        found[key] = TensorInfo(name, tuple(entry["shape"]), DTYPES[entry["dtype"]],
                                start + begin, start + end)
    return found


def weight_files(hf_dir: str) -> List[str]:
    """The safetensors files of ``hf_dir`` (from the index when there is one), in order."""
    index = os.path.join(hf_dir, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
        absent = [name for name in files if not os.path.isfile(os.path.join(hf_dir, name))]
        if absent:
            raise ConversionError(f"{INDEX_NAME} in {hf_dir} names files that are not there: {absent}")
        return files
    files = sorted(name for name in os.listdir(hf_dir) if name.endswith(".safetensors"))
    if not files:
        legacy = [name for name in os.listdir(hf_dir) if name.endswith((".bin", ".pt", ".pth"))]
        hint = (f" (found {legacy[:3]}: re-save them as safetensors, e.g. with transformers' "
                "save_pretrained(safe_serialization=True))") if legacy else ""
        raise ConversionError(f"no *.safetensors weights in {hf_dir}{hint}")
    return files


def scan(hf_dir: str) -> Dict[str, TensorInfo]:
    """Name -> file, shape, dtype, byte range for every tensor, from the headers only."""
    found: Dict[str, TensorInfo] = {}
    for file in weight_files(hf_dir):
        for key, info in read_header(os.path.join(hf_dir, file)).items():
            if key in found:
                raise ConversionError(f"tensor {key} is stored twice: {found[key].file} and {file}")
            found[key] = info
    return found


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (any dtype, bf16 included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def read_tensors(hf_dir: str, infos: Sequence[Tuple[str, TensorInfo]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """The given tensors of one file, one at a time, each read into its own new tensor."""
    if not infos:
        return
    with open(os.path.join(hf_dir, infos[0][1].file), "rb", buffering=0) as handle:
        for name, info in infos:
            tensor = torch.empty(info.shape, dtype=info.dtype)
            handle.seek(info.begin)
            view, done = _bytes_of(tensor), 0
            while done < info.nbytes:
                got = handle.readinto(view[done:])
                if not got:
                    raise ConversionError(f"{info.file} is truncated (tensor {name})")
                done += got
            yield name, tensor


def copy_side_files(src: str, dst: str) -> List[str]:
    """Copies tokenizer/processor/template/code files from ``src`` to ``dst``; returns their names."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and name != INDEX_NAME and \
                any(fnmatch.fnmatch(name, pattern) for pattern in SIDE_FILE_PATTERNS):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


class ShardedWriter:
    """Writes ``model-XXXXX-of-YYYYY.safetensors`` files plus ``model.safetensors.index.json``.

    ``plan`` lists every tensor (name, shape, dtype) in the order they will be added; shards are
    cut from it up front (at most ``max_shard_bytes`` each, a larger tensor alone), so every file
    gets its header first and each added tensor goes straight to disk."""

    def __init__(self, out_dir: str, plan: Sequence[Tuple[str, Sequence[int], torch.dtype]],
                 max_shard_bytes: int, metadata: Optional[Dict[str, str]] = None):
        self.out_dir = out_dir
        self.metadata = dict(metadata or {"format": "pt"})
        self.shards: List[List[Tuple[str, Tuple[int, ...], torch.dtype, int]]] = []
        size = max_shard_bytes + 1
        for name, shape, dtype in plan:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if self.shards and size + nbytes <= max_shard_bytes:
                size += nbytes
            else:
                self.shards.append([])
                size = nbytes
            self.shards[-1].append((name, tuple(shape), dtype, nbytes))
        self.total_bytes = sum(entry[3] for shard in self.shards for entry in shard)
        self._order = [(index, entry) for index, shard in enumerate(self.shards) for entry in shard]
        self._next = 0
        self._handle = None

    def file_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _partial(self, index: int) -> str:
        return os.path.join(self.out_dir, "." + self.file_name(index) + ".partial")

    def _open(self, index: int) -> None:
        header, offset = {"__metadata__": self.metadata}, 0
        for name, shape, dtype, nbytes in self.shards[index]:
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(self._partial(index), "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ConversionError(f"tensor {name} is not in the export plan")
        index, (expected, shape, dtype, _) = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"export plan expected {expected} {shape} {dtype}, got {name} "
                                  f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._handle is None:
            self._open(index)
        self._handle.write(_bytes_of(tensor.detach().contiguous()))
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != index:
            self._handle.close()
            self._handle = None

    def finish(self) -> Dict[str, str]:
        """Renames the shards to their final names and writes the index; returns the weight map."""
        if self._next != len(self._order):
            missing = [entry[0] for _, entry in self._order[self._next:]]
            raise ConversionError(f"export ended before these tensors were written: {missing[:5]}")
        weight_map = {}
        for index, shard in enumerate(self.shards):
            os.replace(self._partial(index), os.path.join(self.out_dir, self.file_name(index)))
            weight_map.update({entry[0]: self.file_name(index) for entry in shard})
        index_doc = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, INDEX_NAME), "w") as handle:
            json.dump(index_doc, handle, indent=2)
            handle.write("\n")
        return weight_map


def pipeline_outputs_in(folder: str) -> List[str]:
    """What of this pipeline's other outputs `folder` holds (training checkpoints, a converted
    dataset): a conversion writing there would mix its files into them."""
    if not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    found = []
    if any(name.startswith("iter_") for name in names) or \
            "latest_checkpointed_iteration.txt" in names:
        found.append("megatron checkpoints (iter_* folders)")
    if ".nv-meta" in names or any(name.endswith(".tar") for name in names):
        found.append("a converted dataset (.nv-meta, .tar shards)")
    return found


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name in (None, "auto"):
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConversionError(f"unknown floating-point dtype {name!r} (use bfloat16, float16 or float32)")
    return value
