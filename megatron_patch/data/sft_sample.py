"""From a converted conversation to model inputs: tokens, targets, image patches; packing; batching.

Pure functions over tensors (no energon here), so the task encoder stays thin and this logic is
tested directly. Conventions follow megatron-core: `labels[i]` is the token after position i and
`loss_mask[i]` says whether that label counts; positions restart at 0 for each packed sample and
`cu_seqlens` marks sample boundaries so attention stays within a sample.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from PIL import Image

from megatron_patch.data.chat_template import encode_conversation
from megatron_patch.data.energon_reader import SampleFormatError
from megatron_patch.data.image_processing import ImageGeometry, image_to_patches
from megatron_patch.data.tokenizer import SFTTokenizer

IGNORE_INDEX = -100


class OverlongSample(ValueError):
    """A sample longer than the sequence length, under the `drop` policy."""


@dataclass
class EncodedSample:
    """One conversation (or a pack of them) ready for batching; all 1-D over the sequence."""
    tokens: torch.Tensor          # [s] int64
    labels: torch.Tensor          # [s] int64, the next token
    loss_mask: torch.Tensor       # [s] float32, 1 where the label is an assistant token
    position_ids: torch.Tensor    # [s] int64, restarting per packed sample
    pixel_values: torch.Tensor    # [patches, patch_dim] float32 (0 rows for text-only)
    image_grid_thw: torch.Tensor  # [images, 3] int64
    seq_lengths: List[int]        # lengths of the samples in this sequence (one unless packed)
    truncated: bool = False

    @property
    def length(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])


def encode_sample(tokenizer: SFTTokenizer, turns: Sequence[dict], images: Sequence[Image.Image],
                  geometry: ImageGeometry, seq_length: int, overlong: str = "drop") -> EncodedSample:
    patches, grids = [], []
    try:
        for image in images:
            image_patches, grid = image_to_patches(image, geometry)
            patches.append(image_patches)
            grids.append(grid)
        merge = geometry.merge_size ** 2
        counts = [t * h * w // merge for t, h, w in grids]
        encoded = encode_conversation(tokenizer, turns, counts)
    except SampleFormatError:
        raise
    except ValueError as error:  # an image too thin to patch, tags that do not match the images
        # energon's handler would drop it with a sample dump, uncounted by --max-bad-sample-fraction
        raise SampleFormatError(str(error)) from error
    ids = torch.tensor(encoded.input_ids, dtype=torch.long)
    mask = torch.tensor(encoded.loss_mask, dtype=torch.float32)
    truncated = False
    # the sequence holds len(ids) tokens; labels are ids shifted by one
    if ids.numel() > seq_length:
        if overlong == "drop":
            raise OverlongSample(f"sample has {ids.numel()} tokens, more than --seq-length {seq_length}")
        cut = _safe_cut(ids, seq_length, tokenizer)
        if cut == 0:
            raise OverlongSample(f"its image tokens alone exceed --seq-length {seq_length}")
        kept_images = int((ids[:cut] == tokenizer.vision_start_id).sum())
        ids, mask, truncated = ids[:cut], mask[:cut], True
        patches, grids = patches[:kept_images], grids[:kept_images]
    labels = torch.cat([ids[1:], torch.tensor([tokenizer.pad_id])])
    loss_mask = torch.cat([mask[1:], torch.zeros(1)])
    patch_dim = geometry.patch_dim
    return EncodedSample(
        tokens=ids, labels=labels, loss_mask=loss_mask,
        position_ids=torch.arange(ids.numel(), dtype=torch.long),
        pixel_values=torch.cat(patches) if patches else torch.zeros(0, patch_dim),
        image_grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
        seq_lengths=[int(ids.numel())], truncated=truncated)


def _safe_cut(ids: torch.Tensor, limit: int, tokenizer: SFTTokenizer) -> int:
    """The largest cut <= limit that does not split an image placeholder."""
    starts = (ids[:limit] == tokenizer.vision_start_id).nonzero().flatten().tolist()
    ends = (ids == tokenizer.vision_end_id).nonzero().flatten().tolist()
    for start in reversed(starts):
        end = next(e for e in ends if e > start)
        if end >= limit:
            return start      # this image does not fit whole: cut before it
        break
    return limit


def pack_samples(samples: Sequence[EncodedSample]) -> EncodedSample:
    """Concatenates samples into one sequence; positions restart per sample."""
    return EncodedSample(
        tokens=torch.cat([s.tokens for s in samples]),
        labels=torch.cat([s.labels for s in samples]),
        loss_mask=torch.cat([s.loss_mask for s in samples]),
        position_ids=torch.cat([s.position_ids for s in samples]),
        pixel_values=torch.cat([s.pixel_values for s in samples]),
        image_grid_thw=torch.cat([s.image_grid_thw for s in samples]),
        seq_lengths=[n for s in samples for n in s.seq_lengths],
        truncated=any(s.truncated for s in samples))


@dataclass
class SFTBatch:
    """A micro batch; sequences padded to one length. `cu_seqlens` is set when packed."""
    tokens: torch.Tensor          # [b, s]
    labels: torch.Tensor          # [b, s]
    loss_mask: torch.Tensor       # [b, s]
    position_ids: torch.Tensor    # [b, s]
    pixel_values: torch.Tensor    # [patches, patch_dim]
    image_grid_thw: torch.Tensor  # [images, 3]
    cu_seqlens: Optional[torch.Tensor] = None  # [n+1] int32 over the flattened b*s tokens
    max_seqlen: int = 0
    real_tokens: int = 0
    num_samples: int = 0


def collate(samples: Sequence[EncodedSample], pad_id: int, pad_to: Optional[int] = None,
            packed: bool = False, multiple_of: int = 1) -> SFTBatch:
    """Right-pads to `pad_to` (default: the longest), rounded up to a multiple of `multiple_of`;
    padding has loss_mask 0 and, when packed, forms its own segment in cu_seqlens so no real
    token attends to it."""
    length = -(-(pad_to or max(s.length for s in samples)) // multiple_of) * multiple_of
    batch = len(samples)
    tokens = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(batch, length)
    position_ids = torch.zeros(batch, length, dtype=torch.long)
    boundaries = [0]
    for row, sample in enumerate(samples):
        n = sample.length
        tokens[row, :n], labels[row, :n] = sample.tokens, sample.labels
        loss_mask[row, :n], position_ids[row, :n] = sample.loss_mask, sample.position_ids
        offset = row * length
        for seq_len in sample.seq_lengths:
            boundaries.append(boundaries[-1] + seq_len)
        if n < length:
            position_ids[row, n:] = torch.arange(length - n)
            boundaries.append(offset + length)
    cu_seqlens = None
    max_seqlen = length
    if packed:
        cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return SFTBatch(tokens, labels, loss_mask, position_ids,
                    torch.cat([s.pixel_values for s in samples]),
                    torch.cat([s.image_grid_thw for s in samples]),
                    cu_seqlens, max_seqlen, real_tokens=sum(s.length for s in samples),
                    num_samples=sum(len(s.seq_lengths) for s in samples))
