"""The trainer's energon task encoder: cooked conversation -> model inputs -> packed micro-batch.

Energon calls, per data worker: `encode_sample` on each cooked `LlavaSftSample` (decode images,
render the chat template, apply the over-long policy), optionally `select_samples_to_pack` on a
buffer of encoded samples and `pack_selected_samples` on each chosen group, then `batch` on
`micro_batch_size` (packed) samples. Those methods are `@stateless` (energon re-runs them on
restore to rebuild its buffers, which is what makes resume exact).

Over-long samples under `--overlong drop` (and samples that truncation cannot keep) are skipped
with energon's `SkipSample`, which energon drops without logging, so we count them: each worker's
encoder counts its drops and the next micro-batch it emits carries the count in
`dropped_overlong` (the drops since that worker's previous batch). Energon saves loader state only
at batch boundaries, where the count is zero, so resumed runs report the same counts. A run whose
samples are all too long would otherwise spin forever on an infinite loader: after
`max_consecutive_drops` drops in a row the worker stops with `AllSamplesOverlong`.

A sample that does not decode (a corrupt image, broken JSON: bit rot or a tar edited after
conversion) is skipped the same way and counted in `bad_samples`, with a warning naming its shard
and key; the trainer stops when their share grows too large. The cooker marks such samples instead
of raising, because energon would otherwise swallow the error in its own handler, uncounted.

Encoded samples are energon `Sample`s (`SFTEncodedSample`): energon keys its packing buffer and
batches on each sample's `__restore_key__`, which a plain dataclass would silently lack.
"""
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from megatron.energon import (Batch, Cooker, Sample, SkipSample, basic_sample_keys, edataclass,
                              stateless)
from megatron.energon.errors import FatalSampleError

from megatron_patch.data.energon_reader import (LlavaSftSample, LlavaSftTaskEncoder,
                                                SampleFormatError, cook_llava_sample,
                                                decode_images)
from megatron_patch.data.image_processing import ImageGeometry
from megatron_patch.data.packing import plan_packs
from megatron_patch.data.sft_sample import (EncodedSample, OverlongSample, SFTBatch, collate,
                                            encode_sample, pack_samples)
from megatron_patch.data.tokenizer import SFTTokenizer

logger = logging.getLogger(__name__)

OVERLONG_POLICIES = ("drop", "truncate")


class AllSamplesOverlong(FatalSampleError):
    """Too many samples in a row exceed --seq-length: the run would never get a batch."""


class AllSamplesBad(FatalSampleError):
    """Too many samples in a row fail to decode: the data is broken, not a sample here and there."""


DATA_STOPS = (AllSamplesOverlong, AllSamplesBad)


def find_data_stop(error: BaseException) -> Optional[FatalSampleError]:
    """The :data:`DATA_STOPS` error behind what the loader raised, if any. energon raises its own
    ``FatalSampleError`` while handling ours (the sample's whole repr as its message); from a
    loader worker, torch re-raises the worker's error with only its traceback's text."""
    chain, seen = [error], set()
    while chain:
        current = chain.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DATA_STOPS):
            return current
        for kind in DATA_STOPS:
            match = re.search(rf"\b{kind.__name__}: (.+)", str(current))
            if match:
                return kind(match.group(1))
        chain += [current.__cause__, current.__context__]
    return None


@stateless
def cook_or_flag(crude: dict) -> LlavaSftSample:
    """`cook_llava_sample`, but a malformed sample comes back flagged (`format_error`) so that
    `encode_sample` can count and name it."""
    try:
        return cook_llava_sample(crude)
    except SampleFormatError as error:
        return LlavaSftSample(**basic_sample_keys(crude), id=None, conversations=[],
                              image_names=[], images=[], format_error=str(error))


def sample_location(sample) -> str:
    """'<shard> key <key>' for messages (energon records the shard in `__sources__`)."""
    shards = sorted({source.shard_name for source in (sample.__sources__ or ())})
    return f"{', '.join(shards) or 'unknown shard'} key {sample.__key__}"


@dataclass
class EncoderSettings:
    seq_length: int
    min_pixels: int = ImageGeometry.min_pixels
    max_pixels: int = ImageGeometry.max_pixels
    overlong: str = "drop"               # 'drop' | 'truncate'
    packing: bool = False
    max_images_per_pack: int = 16
    max_samples_per_pack: Optional[int] = None  # CUDA graphs: a fixed number of segments
    packing_buffer_size: int = 64        # samples energon buffers to choose packs from
    pad_to_seq_length: bool = False      # pad every micro-batch to seq_length (PP > 1, packing)
    pad_to_multiple_of: int = 1          # sequence parallelism splits the length over TP ranks
    max_consecutive_drops: int = 1000    # then AllSamplesOverlong/-Bad instead of spinning forever

    def __post_init__(self):
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, not {self.overlong!r}")
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be positive, not {self.seq_length}")
        if self.packing and (self.max_images_per_pack < 1 or self.packing_buffer_size < 1
                             or (self.max_samples_per_pack or 1) < 1):
            raise ValueError("packing needs max_images_per_pack, max_samples_per_pack and "
                             "packing_buffer_size >= 1")
        if self.pad_to_multiple_of < 1 or (self.pads_to_seq_length
                                           and self.seq_length % self.pad_to_multiple_of):
            raise ValueError(f"pad_to_multiple_of {self.pad_to_multiple_of} must be positive and "
                             f"divide seq_length {self.seq_length} when padding to it")

    @property
    def pads_to_seq_length(self) -> bool:
        return self.packing or self.pad_to_seq_length

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry(min_pixels=self.min_pixels, max_pixels=self.max_pixels)


@edataclass
class SFTEncodedSample(Sample):
    """One encoded sequence (a single sample, or a pack) with the keys and ids it holds."""
    encoded: EncodedSample
    keys: List[str]
    ids: List[Any]
    truncated: int = 0       # samples in this sequence that were truncated


@edataclass
class SFTMicroBatch(Batch):
    """A micro-batch: `SFTBatch`'s fields plus data statistics for the trainer's logs.

    `__key__` lists the keys of every sample in it (packed ones included), in row order, and
    `ids` their record ids.
    """
    tokens: torch.Tensor          # [b, s]
    labels: torch.Tensor          # [b, s]
    loss_mask: torch.Tensor       # [b, s]
    position_ids: torch.Tensor    # [b, s]
    pixel_values: torch.Tensor    # [patches, patch_dim]
    image_grid_thw: torch.Tensor  # [images, 3]
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    real_tokens: int = 0
    num_samples: int = 0
    ids: List[Any] = field(default_factory=list)
    dropped_overlong: int = 0     # samples this worker dropped since its previous micro-batch
    bad_samples: int = 0          # samples this worker could not decode since then
    truncated: int = 0            # truncated samples in this micro-batch
    num_images: int = 0
    capacity: int = 0             # b * padded length: the token slots the model computes

    @property
    def packing_efficiency(self) -> float:
        return self.real_tokens / self.capacity if self.capacity else 0.0

    @property
    def images_per_sequence(self) -> float:
        rows = int(self.tokens.shape[0])
        return self.num_images / rows if rows else 0.0

    def to_sft_batch(self) -> SFTBatch:
        return SFTBatch(self.tokens, self.labels, self.loss_mask, self.position_ids,
                        self.pixel_values, self.image_grid_thw, self.cu_seqlens, self.max_seqlen,
                        self.real_tokens, self.num_samples)


def with_full_rows(batch: SFTMicroBatch, rows: int) -> SFTMicroBatch:
    """`batch` grown to `rows` rows with loss-masked padding rows (each its own packed segment).

    The last micro-batch of a pass over the val split may hold fewer samples than
    --micro-batch-size; pipeline stages exchange activations of one fixed shape
    [seq, micro_batch_size, hidden], so the evaluation fills it instead of dropping its samples.
    """
    missing = rows - int(batch.tokens.shape[0])
    if missing <= 0:
        return batch
    length = int(batch.tokens.shape[1])

    def grown(tensor: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, row.to(tensor.dtype).expand(missing, length)])

    zeros = torch.zeros(length)
    cu_seqlens, max_seqlen = batch.cu_seqlens, batch.max_seqlen
    if cu_seqlens is not None:
        ends = cu_seqlens[-1] + length * torch.arange(1, missing + 1, dtype=cu_seqlens.dtype)
        cu_seqlens, max_seqlen = torch.cat([cu_seqlens, ends]), max(max_seqlen, length)
    return dataclasses.replace(
        batch, tokens=grown(batch.tokens, zeros), labels=grown(batch.labels, zeros),
        loss_mask=grown(batch.loss_mask, zeros), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        position_ids=grown(batch.position_ids, torch.arange(length)),
        capacity=batch.capacity + missing * length)


class SFTTaskEncoder(LlavaSftTaskEncoder):
    """Picklable (energon sends it to its workers): a tokenizer, settings and drop counters."""

    cookers = (Cooker(cook_or_flag),)

    def __init__(self, tokenizer: SFTTokenizer, settings: EncoderSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.geometry = settings.geometry
        self.reset_counters()

    def reset_counters(self) -> None:
        self._dropped_since_batch = 0
        self._consecutive_drops = 0
        self._bad_since_batch = 0
        self._consecutive_bad = 0

    # ------------------------------------------------------------------ per sample
    @stateless
    def encode_sample(self, sample: LlavaSftSample) -> SFTEncodedSample:
        settings = self.settings
        try:
            if sample.format_error:
                raise SampleFormatError(sample.format_error)
            encoded = encode_sample(self.tokenizer, sample.conversations, decode_images(sample),
                                    self.geometry, settings.seq_length, settings.overlong)
        except SampleFormatError as error:
            self._skip_bad_sample(sample, error)
        except OverlongSample as error:
            self._dropped_since_batch += 1
            self._consecutive_drops += 1
            if self._consecutive_drops >= settings.max_consecutive_drops:
                raise AllSamplesOverlong(
                    f"{self._consecutive_drops} samples in a row are longer than --seq-length "
                    f"{settings.seq_length} (last: {sample.__key__}: {error}); raise "
                    "--seq-length, lower --max-pixels or use --overlong truncate") from error
            raise SkipSample() from error
        self._consecutive_drops = self._consecutive_bad = 0
        return SFTEncodedSample.derive_from(
            sample, encoded=encoded, keys=[sample.__key__], ids=[sample.id],
            truncated=int(encoded.truncated))

    def _skip_bad_sample(self, sample: LlavaSftSample, error: Exception) -> None:
        self._bad_since_batch += 1
        self._consecutive_bad += 1
        where = sample_location(sample)
        if self._consecutive_bad >= self.settings.max_consecutive_drops:
            raise AllSamplesBad(
                f"{self._consecutive_bad} samples in a row failed to decode (last: {where}: "
                f"{error}); check the data with tools/inspect_webdataset.py --validate") from error
        logger.warning("skipping a sample that does not decode: %s: %s", where, error)
        raise SkipSample() from error

    # ------------------------------------------------------------------ packing
    def select_samples_to_pack(self, samples: List[SFTEncodedSample]
                               ) -> List[List[SFTEncodedSample]]:
        """Best-fit-decreasing groups under seq_length tokens, max_images_per_pack images and
        max_samples_per_pack samples."""
        groups = plan_packs([s.encoded.length for s in samples],
                            [s.encoded.num_images for s in samples],
                            self.settings.seq_length, self.settings.max_images_per_pack,
                            self.settings.max_samples_per_pack)
        return [[samples[i] for i in group] for group in groups]

    @stateless
    def pack_selected_samples(self, samples: List[SFTEncodedSample]) -> SFTEncodedSample:
        keys = [key for s in samples for key in s.keys]
        sources = tuple(src for s in samples for src in (s.__sources__ or ()))
        return SFTEncodedSample.derive_from(
            samples[0], __key__="+".join(keys), __sources__=sources or None,
            encoded=pack_samples([s.encoded for s in samples]), keys=keys,
            ids=[i for s in samples for i in s.ids], truncated=sum(s.truncated for s in samples))

    # ------------------------------------------------------------------ per micro-batch
    @stateless
    def batch(self, samples: List[SFTEncodedSample]) -> SFTMicroBatch:
        settings = self.settings
        pad_to = settings.seq_length if settings.pads_to_seq_length else None
        collated = collate([s.encoded for s in samples], self.tokenizer.pad_id, pad_to=pad_to,
                           packed=settings.packing, multiple_of=settings.pad_to_multiple_of)
        dropped, self._dropped_since_batch = self._dropped_since_batch, 0
        bad, self._bad_since_batch = self._bad_since_batch, 0
        sources = tuple(src for s in samples for src in (s.__sources__ or ()))
        return SFTMicroBatch(
            __key__=[key for s in samples for key in s.keys], __restore_key__=(),
            __sources__=sources or None,
            tokens=collated.tokens, labels=collated.labels, loss_mask=collated.loss_mask,
            position_ids=collated.position_ids, pixel_values=collated.pixel_values,
            image_grid_thw=collated.image_grid_thw, cu_seqlens=collated.cu_seqlens,
            max_seqlen=collated.max_seqlen, real_tokens=collated.real_tokens,
            num_samples=collated.num_samples, ids=[i for s in samples for i in s.ids],
            dropped_overlong=dropped, bad_samples=bad, truncated=sum(s.truncated for s in samples),
            num_images=int(collated.image_grid_thw.shape[0]),
            capacity=int(collated.tokens.numel()))


__all__ = ["AllSamplesBad", "AllSamplesOverlong", "cook_or_flag", "sample_location",
           "EncoderSettings", "SFTEncodedSample", "SFTMicroBatch", "SFTTaskEncoder",
           "with_full_rows"]
