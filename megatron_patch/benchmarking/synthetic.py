"""Synthetic packed SFT micro-batches, in the format the SFT task encoder emits.

Every sample is shaped like an encoded LLaVA conversation: a prompt (masked), one run of
``<|vision_start|><|image_pad|>*N<|vision_end|>`` per image (masked), and an answer (in the loss).
Text lengths are lognormal (many short answers, a tail of long ones, like real SFT mixes); image
sides are drawn uniformly in multiples of 28 pixels (patch 14 x merge 2), so an h x w image has
(h/14)*(w/14) patches and a quarter as many image tokens. Samples are grouped into packs by the
trainer's own planner (:func:`megatron_patch.data.packing.plan_packs`, best-fit decreasing over a
buffer of ``packing_buffer_size`` samples, as energon does) and collated by
:func:`megatron_patch.data.sft_sample.collate`, then wrapped like ``SFTTaskEncoder.batch`` wraps
them, so the benchmark feeds the model exactly what training feeds it.

Deterministic for a seed: the megatron trainer and the baseline get the very same batches.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

from megatron_patch.data.packing import plan_packs
from megatron_patch.data.sft_sample import EncodedSample, collate, pack_samples
from megatron_patch.data.sft_task_encoder import SFTMicroBatch

# Qwen2-VL/Qwen3 ids, used when the model has the real vocabulary (image token 151655)
QWEN_IDS = dict(pad_id=151643, vision_start_id=151652, vision_end_id=151653)
FIRST_TEXT_ID = 16  # text ids start above the special tokens of the project's tiny tokenizer


@dataclass
class SyntheticSpec:
    vocab_size: int
    image_token_id: int
    seq_length: int
    patch_dim: int = 3 * 14 * 14
    merge_size: int = 2
    patch_size: int = 14
    images_per_sample: int = 1
    image_side_min: int = 224          # pixels, multiple of patch*merge (28)
    image_side_max: int = 672
    text_length_median: float = 550.0  # lognormal text tokens per sample
    text_length_sigma: float = 0.9
    answer_fraction: float = 0.4       # share of a sample's text tokens in the loss
    max_images_per_pack: int = 32
    max_samples_per_pack: Optional[int] = None
    packing_buffer_size: int = 64
    seed: int = 1234

    def __post_init__(self):
        unit = self.patch_size * self.merge_size
        if self.image_side_min % unit or self.image_side_max % unit:
            raise ValueError(f"image sides must be multiples of {unit} pixels")
        if not 0 < self.image_side_min <= self.image_side_max:
            raise ValueError("need 0 < image_side_min <= image_side_max")
        if self.images_per_sample < 0:
            raise ValueError("images_per_sample must be >= 0")

    @property
    def special_ids(self) -> dict:
        if self.image_token_id == 151655 and self.vocab_size > 151655:
            return dict(QWEN_IDS)
        # the project's tiny tokenizer order: pad, im_start, im_end, vision_start, vision_end, image
        return dict(pad_id=0, vision_start_id=self.image_token_id - 2,
                    vision_end_id=self.image_token_id - 1)

    @property
    def text_id_range(self) -> tuple:
        high = min(self.vocab_size, QWEN_IDS["pad_id"])  # below every Qwen special token
        low = FIRST_TEXT_ID if self.image_token_id < FIRST_TEXT_ID else 0
        if high - low < 2:
            raise ValueError(f"vocab {self.vocab_size} too small for synthetic text")
        return low, high


class SyntheticPackedBatches:
    """Endless iterator of packed :class:`SFTMicroBatch` (micro-batch size 1, padded to
    ``seq_length``). ``dropped_overlong`` counts samples longer than seq_length (dropped, as the
    trainer's default ``--overlong drop`` does)."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.torch_rng = torch.Generator().manual_seed(spec.seed)
        self.ids = spec.special_ids
        self.pending: List[EncodedSample] = []
        self.dropped_overlong = 0
        self._dropped_since_batch = 0
        self.samples_made = 0
        self.samples_emitted = 0

    # ------------------------------------------------------------------ one sample
    def _image_grid(self) -> tuple:
        unit = self.spec.patch_size * self.spec.merge_size
        lo, hi = self.spec.image_side_min // unit, self.spec.image_side_max // unit
        h, w = self.rng.randint(lo, hi), self.rng.randint(lo, hi)
        return 1, h * self.spec.merge_size, w * self.spec.merge_size  # (t, h, w) in patches

    def make_sample(self) -> EncodedSample:
        spec, ids = self.spec, self.ids
        text = max(8, int(self.rng.lognormvariate(math.log(spec.text_length_median),
                                                  spec.text_length_sigma)))
        answer = max(2, int(text * spec.answer_fraction))
        prompt = text - answer
        low, high = spec.text_id_range
        grids = [self._image_grid() for _ in range(spec.images_per_sample)]
        pieces, in_loss = [], []

        def add(tokens: torch.Tensor, counts: bool) -> None:
            pieces.append(tokens)
            in_loss.append(torch.full((tokens.numel(),), float(counts)))

        first = prompt // 2  # part of the prompt before the images, part after
        add(torch.randint(low, high, (first,), generator=self.torch_rng), False)
        for t, h, w in grids:
            image_tokens = t * h * w // spec.merge_size ** 2
            add(torch.tensor([ids["vision_start_id"]] + [spec.image_token_id] * image_tokens
                             + [ids["vision_end_id"]]), False)
        add(torch.randint(low, high, (prompt - first,), generator=self.torch_rng), False)
        add(torch.randint(low, high, (answer,), generator=self.torch_rng), True)
        tokens = torch.cat(pieces).long()
        mask = torch.cat(in_loss)
        patches = sum(t * h * w for t, h, w in grids)
        self.samples_made += 1
        # labels[i] = tokens[i+1]; loss on answer tokens (as encode_sample shifts the mask)
        return EncodedSample(
            tokens=tokens,
            labels=torch.cat([tokens[1:], torch.tensor([ids["pad_id"]])]),
            loss_mask=torch.cat([mask[1:], torch.zeros(1)]),
            position_ids=torch.arange(tokens.numel()),
            pixel_values=torch.randn(patches, spec.patch_dim, generator=self.torch_rng),
            image_grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
            seq_lengths=[int(tokens.numel())])

    # ------------------------------------------------------------------ packs and batches
    def _fill(self) -> None:
        """Encode a buffer of samples and plan packs over it (as energon's packing buffer)."""
        buffer: List[EncodedSample] = []
        while len(buffer) < self.spec.packing_buffer_size:
            sample = self.make_sample()
            if sample.length > self.spec.seq_length:
                self.dropped_overlong += 1
                self._dropped_since_batch += 1
                if self._dropped_since_batch > 1000:
                    raise ValueError("every synthetic sample exceeds --seq-length; raise it or "
                                     "lower the text length / image sizes")
                continue
            buffer.append(sample)
        groups = plan_packs([s.length for s in buffer], [s.num_images for s in buffer],
                            self.spec.seq_length, self.spec.max_images_per_pack,
                            self.spec.max_samples_per_pack)
        self.pending.extend(pack_samples([buffer[i] for i in group]) for group in groups)

    def __iter__(self) -> Iterator[SFTMicroBatch]:
        return self

    def __next__(self) -> SFTMicroBatch:
        if not self.pending:
            self._fill()
        packed = self.pending.pop(0)
        first = self.samples_emitted
        self.samples_emitted += len(packed.seq_lengths)
        keys = [f"synthetic-{i}" for i in range(first, self.samples_emitted)]
        return micro_batch([packed], self.ids["pad_id"], self.spec.seq_length,
                           dropped=self._take_dropped(), keys=keys)

    def _take_dropped(self) -> int:
        dropped, self._dropped_since_batch = self._dropped_since_batch, 0
        return dropped

    def take(self, count: int) -> List[SFTMicroBatch]:
        return [next(self) for _ in range(count)]


def micro_batch(sequences: List[EncodedSample], pad_id: int, seq_length: Optional[int],
                dropped: int = 0, keys: Optional[List[str]] = None) -> SFTMicroBatch:
    """What ``SFTTaskEncoder.batch`` builds from packed sequences (padded to seq_length)."""
    collated = collate(sequences, pad_id, pad_to=seq_length, packed=True)
    count = collated.num_samples
    keys = keys or [f"synthetic-{i}" for i in range(count)]
    return SFTMicroBatch(
        __key__=keys, __restore_key__=(), __sources__=None,
        tokens=collated.tokens, labels=collated.labels, loss_mask=collated.loss_mask,
        position_ids=collated.position_ids, pixel_values=collated.pixel_values,
        image_grid_thw=collated.image_grid_thw, cu_seqlens=collated.cu_seqlens,
        max_seqlen=collated.max_seqlen, real_tokens=collated.real_tokens,
        num_samples=count, ids=list(range(count)), dropped_overlong=dropped, truncated=0,
        num_images=int(collated.image_grid_thw.shape[0]), capacity=int(collated.tokens.numel()))


def long_tailed_lengths(count: int, seed: int = 0, capacity: int = 8192, median: float = 545.0,
                        sigma: float = 0.9, minimum: int = 16) -> List[int]:
    """Lognormal token lengths clipped to [minimum, capacity] (the packing-efficiency study)."""
    rng = random.Random(seed)
    return [min(capacity, max(minimum, int(rng.lognormvariate(math.log(median), sigma))))
            for _ in range(count)]


__all__ = ["SyntheticSpec", "SyntheticPackedBatches", "micro_batch", "long_tailed_lengths"]
