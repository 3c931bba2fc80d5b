"""Checking one raw sample from a tar: the trainer's cooker, then its images.

The same `cook_llava_sample` the energon loader uses runs here, so the inspector accepts exactly
what the trainer accepts. Images are opened header-only for sizes (cheap), or fully decoded with
`full_decode` (what --validate does: corrupt pixel data often passes the header).
"""
import io
from dataclasses import dataclass, field
from typing import List, Optional

from PIL import Image

from megatron_patch.data.energon_reader import LlavaSftSample, SampleFormatError, cook_llava_sample
from megatron_patch.data.image_view import MAX_ASPECT_RATIO, too_thin
from megatron_patch.data.shard_format import JSON_PART
from megatron_patch.data.shard_scan import Problem, ShardSample


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str   # PIL's format name, e.g. PNG, JPEG


@dataclass
class CheckedSample:
    shard: str
    key: str
    sample: Optional[LlavaSftSample]                    # None when the sample does not cook
    images: List[ImageInfo] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.sample is not None and not self.problems


def check_sample(raw: ShardSample, full_decode: bool) -> CheckedSample:
    checked = CheckedSample(raw.shard, raw.key, None)
    crude = {"__key__": raw.key, "__restore_key__": (raw.shard, raw.key), **raw.parts}
    try:
        checked.sample = cook_llava_sample(crude)
    except SampleFormatError as error:
        checked.problems.append(Problem(raw.shard, raw.key, _without_key(str(error), raw.key)))
        return checked
    unused = sorted(set(raw.parts) - {JSON_PART} - set(checked.sample.image_names))
    if unused:
        checked.problems.append(Problem(raw.shard, raw.key, f"parts {unused} are not listed in "
                                                            "the json: the trainer ignores them"))
    for name, data in zip(checked.sample.image_names, checked.sample.images):
        try:
            info = image_info(data, full_decode)
        except Exception as error:  # PIL raises many types for bad bytes
            checked.problems.append(Problem(raw.shard, raw.key, f"image {name} does not decode: "
                                                                f"{type(error).__name__}: {error}"))
            continue
        if too_thin(info.width, info.height):
            checked.problems.append(Problem(raw.shard, raw.key, (
                f"image {name} is {info.width}x{info.height}, over {MAX_ASPECT_RATIO}:1: too "
                "thin for the vision tower (the trainer skips the sample as bad)")))
            continue
        checked.images.append(info)
    return checked


def image_info(data: bytes, full_decode: bool) -> ImageInfo:
    """Size and format from the header; with `full_decode` also `verify()` (checks PNG chunk
    CRCs: a PNG with rotten pixel bytes often still `load()`s) and a full `load()` (catches
    truncated JPEGs, which `verify()` passes)."""
    with Image.open(io.BytesIO(data)) as image:
        info = ImageInfo(image.width, image.height, image.format or "?")
        if full_decode:
            image.verify()
    if full_decode:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    return info


def _without_key(message: str, key: str) -> str:
    prefix = f"sample {key}: "
    return message[len(prefix):] if message.startswith(prefix) else message
