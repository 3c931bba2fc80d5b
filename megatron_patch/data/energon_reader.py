"""Reading converted shards back through energon: the path the trainer's data loader takes.

Our shards are a `CrudeWebdataset` (see shard_format.py): energon hands us a plain dict per
sample (`__key__`, `json`, `img0.png`, ...) and a *cooker* turns it into a typed sample. The task
encoder here sets `decoder = None`, so the cooked sample keeps the *encoded* image bytes:

- decoding happens in our code (`decode_images`), where a failure names the sample and the part,
  and where the trainer decides the colour mode and when to pay for it (e.g. only after a length
  filter);
- the inspector runs this same cooker on the tars, so it accepts exactly what the trainer does.

Energon's default error policy logs a failed sample and skips it (100 in a row are fatal). A
reader that must see every sample (counting, validation, evaluation) passes `on_error`; the
default here re-raises, so `iter_split_samples` never silently drops a sample.
"""
import io
import warnings
from dataclasses import field
from typing import Any, Callable, Iterator, List, Optional

from megatron.energon import (Cooker, Sample, TaskEncoder, WorkerConfig,
                              basic_sample_keys, edataclass, get_loader, get_val_dataset,
                              stateless)
from megatron.energon.errors import reraise_exception
from PIL import Image

from megatron_patch.data.image_view import model_view
from megatron_patch.data.shard_format import (IMAGE_TAG, JSON_PART, ROLE_ASSISTANT, ROLE_SYSTEM,
                                              ROLE_USER, decode_sample_json)

ROLES = (ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT)

# (exception, sample or crude dict, source infos) -> None; raise to stop, return to skip
ErrorHandler = Callable[[Exception, Any, Optional[list]], None]


class SampleFormatError(ValueError):
    """A sample whose parts do not follow shard_format.py (missing part, tag/image mismatch)."""


@edataclass
class LlavaSftSample(Sample):
    """One converted conversation, images still encoded (bytes in `<image>` tag order)."""
    id: Any
    conversations: List[dict]
    image_names: List[str]
    images: List[bytes]
    source: Optional[str] = None
    meta: dict = field(default_factory=dict)
    format_error: Optional[str] = None  # set by a tolerant cooker instead of raising


@stateless
def cook_llava_sample(crude: dict) -> LlavaSftSample:
    """Crude dict -> LlavaSftSample; raises SampleFormatError naming what is wrong."""
    key = crude.get("__key__", "?")
    if JSON_PART not in crude:
        raise SampleFormatError(f"sample {key}: no '{JSON_PART}' part (parts: "
                                f"{sorted(k for k in crude if not k.startswith('__'))})")
    raw = crude[JSON_PART]
    try:
        record = raw if isinstance(raw, dict) else decode_sample_json(raw)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SampleFormatError(f"sample {key}: '{JSON_PART}' part is not valid JSON: {error}") \
            from error
    if not isinstance(record, dict):
        raise SampleFormatError(f"sample {key}: '{JSON_PART}' part is a {type(record).__name__}, "
                                "not an object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleFormatError(f"sample {key}: json has no 'conversations' list")
    for number, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("from") in ROLES
                and isinstance(turn.get("value"), str)):
            raise SampleFormatError(f"sample {key}: turn {number} is not "
                                    f"{{'from': one of {list(ROLES)}, 'value': text}}")
    names = list(record.get("images") or [])
    missing = [name for name in names if name not in crude]
    if missing:
        raise SampleFormatError(f"sample {key}: json lists image part(s) {missing} that the "
                                "tar does not hold")
    tags = sum(turn["value"].count(IMAGE_TAG) for turn in turns)
    if tags != len(names):
        raise SampleFormatError(f"sample {key}: {tags} {IMAGE_TAG} tag(s) but {len(names)} "
                                "image(s)")
    return LlavaSftSample(
        **basic_sample_keys(crude), id=record.get("id"), conversations=turns,
        image_names=names, images=[crude[name] for name in names],
        source=record.get("source"), meta=record.get("meta") or {})


def decode_images(sample: LlavaSftSample) -> List[Image.Image]:
    """Decodes the sample's images as the model sees them (`model_view`: upright, RGB);
    errors name the part."""
    images = []
    for name, data in zip(sample.image_names, sample.images):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                images.append(model_view(image))
        except Exception as error:  # PIL raises many types for bad bytes
            raise SampleFormatError(f"sample {sample.__key__}: image part {name} does not decode: "
                                    f"{type(error).__name__}: {error}") from error
    return images


class LlavaSftTaskEncoder(TaskEncoder):
    """Base task encoder for our shards: cooks crude samples, keeps image bytes.

    Subclasses (the trainer's) override `encode_sample` / `batch` / packing; they must keep
    those methods `@stateless` (energon's requirement for exact resume).
    """

    cookers = (Cooker(cook_llava_sample),)
    decoder = None  # no energon-side decoding: images stay bytes, `json` stays bytes


def split_worker_config(on_error: ErrorHandler = reraise_exception) -> WorkerConfig:
    """A single-process, single-rank worker config whose sample errors go to `on_error`."""
    return WorkerConfig(rank=0, world_size=1, num_workers=0, global_error_handler=on_error)


def iter_split_samples(path: str, split: str = "train", on_error: ErrorHandler = reraise_exception,
                       task_encoder: Optional[TaskEncoder] = None) -> Iterator[LlavaSftSample]:
    """Every sample of `split`, exactly once, in shard order, cooked by energon.

    `on_error` sees each failing sample (default: re-raise, i.e. stop at the first bad sample);
    a handler that returns makes energon skip the sample and go on.
    """
    worker_config = split_worker_config(on_error)
    dataset = get_val_dataset(
        str(path), split_part=split, worker_config=worker_config, batch_size=None,
        task_encoder=task_encoder or LlavaSftTaskEncoder())
    loader = get_loader(dataset, watchdog_timeout_seconds=None)
    with warnings.catch_warnings():
        # energon's loader asks torch to pin memory; without a GPU torch warns on every start
        warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true")
        samples = iter(loader)
    yield from samples


__all__ = ["LlavaSftSample", "LlavaSftTaskEncoder", "SampleFormatError", "cook_llava_sample",
           "decode_images", "iter_split_samples", "split_worker_config"]
