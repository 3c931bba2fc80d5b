"""How many samples one packed sequence holds, estimated before launch.

With --packing the trainer's global batch counts packed *sequences*, while the dataset counts
samples (conversations). The launcher needs the ratio to turn EPOCHS into steps: at seq 8192 a
sequence may hold ten SFT samples, and a plan that ignored it would train ten epochs instead of
one. The estimate runs the trainer's own pieces on the first `limit` train samples: the chat
template and image-token counts of the inspector (image headers only, no decoding) for the
lengths, and the packer (`plan_packs`, buffer by buffer, with the image cap) for the packs.
"""
import itertools
import logging
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from megatron_patch.data.blends import blend_members, is_blend
from megatron_patch.data.energon_reader import iter_split_samples
from megatron_patch.data.image_processing import ImageGeometry
from megatron_patch.data.inspect_stats import TokenCounter
from megatron_patch.data.packing import plan_packs
from megatron_patch.data.sample_check import image_info
from megatron_patch.data.tokenizer import SFTTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackingEstimate:
    samples_per_sequence: float  # samples the loader reads per sequence, dropped ones included
    samples_read: int
    overlong: int            # samples longer than seq_length (dropped by default)
    efficiency: float        # real tokens / (sequences x seq_length)


def sample_lengths(data_path: str, tokenizer_path: str, geometry: ImageGeometry,
                   limit: int) -> List[Tuple[int, int]]:
    """(tokens as trained, images) of the first `limit` train samples; bad samples are skipped.
    For a blend, the first samples of each member in the blend's proportions (of `limit`), in a
    fixed shuffled order, as the trainer's packer would see them mixed."""
    if is_blend(data_path):
        members = blend_members(data_path)
        total = sum(weight for _, weight in members)
        lengths = [length for member, weight in members
                   for length in sample_lengths(member, tokenizer_path, geometry,
                                                max(1, round(limit * weight / total)))]
        random.Random(0).shuffle(lengths)
        return lengths
    counter = TokenCounter(SFTTokenizer(tokenizer_path), geometry)
    samples = iter_split_samples(data_path, "train", on_error=lambda *_: None)
    lengths = []
    for sample in itertools.islice(samples, limit):
        images = [image_info(data, full_decode=False) for data in sample.images]
        tokens, _ = counter.count(sample.conversations, images)
        lengths.append((tokens, len(images)))
    return lengths


def estimate_packing(lengths: Sequence[Tuple[int, int]], seq_length: int, max_images: int,
                     buffer_size: int, truncate: bool = False) -> PackingEstimate:
    """Over-long samples are dropped (the trainer's default), yet read: an epoch of the data
    passes in fewer sequences. With `truncate` they fill a sequence each."""
    overlong = sum(n > seq_length for n, _ in lengths)
    if truncate:
        packed = [(min(n, seq_length), images) for n, images in lengths]
    else:
        packed = [(n, images) for n, images in lengths if n <= seq_length]
    sequences = 0
    for start in range(0, len(packed), buffer_size):
        buffer = packed[start:start + buffer_size]
        sequences += len(plan_packs([n for n, _ in buffer], [i for _, i in buffer], seq_length,
                                    max_images))
    if not sequences:
        return PackingEstimate(1.0, len(lengths), overlong, 0.0)
    return PackingEstimate(len(lengths) / sequences, len(lengths), overlong,
                           sum(n for n, _ in packed) / (sequences * seq_length))


def estimate_from_trainer_args(data_path: str, tokenizer_path: str, trainer_args: Sequence[str],
                               limit: int = 1000) -> PackingEstimate:
    """The estimate for the settings in the trainer's own arguments (seq length, pixel limits,
    image cap, packing buffer), parsed with the trainer's parser and defaults."""
    from megatron_patch.training.arguments import build_parser, default_packing_buffer_size
    args, _ = build_parser().parse_known_args(
        ["--train-iters", "1", "--data-path", data_path, "--tokenizer-path", tokenizer_path,
         *trainer_args])
    buffer = args.packing_buffer_size or default_packing_buffer_size(args.seq_length)
    geometry = ImageGeometry(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    lengths = sample_lengths(data_path, tokenizer_path, geometry, limit)
    return estimate_packing(lengths, args.seq_length, args.max_images_per_pack, buffer,
                            truncate=args.overlong == "truncate")
