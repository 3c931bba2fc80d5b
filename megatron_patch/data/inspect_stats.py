"""Dataset statistics for the inspector: what a user checks before spending GPU hours.

Everything is kept as value counts (not lists of values), so memory stays bounded on large
datasets and every histogram is exact. Token lengths, when a tokenizer is given, are the exact
lengths the trainer will see: the same ChatML rendering (`encode_conversation`) with
`(h/28)*(w/28)` image pads per image after the Qwen2-VL resize within `max_pixels`, plus
`<|vision_start|>`/`<|vision_end|>`.
"""
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from megatron_patch.data.chat_template import encode_conversation
from megatron_patch.data.image_processing import ImageGeometry, image_token_count
from megatron_patch.data.sample_check import CheckedSample, ImageInfo
from megatron_patch.data.tokenizer import SFTTokenizer


class Distribution:
    """Exact summary of integer values from their counts."""

    def __init__(self):
        self.counts = Counter()

    def add(self, value: int) -> None:
        self.counts[value] += 1

    def summary(self) -> dict:
        total = sum(self.counts.values())
        if not total:
            return {"count": 0}
        values = sorted(self.counts)
        return {"count": total, "min": values[0], "mean": round(
            sum(v * n for v, n in self.counts.items()) / total, 2),
            "p50": self.percentile(50), "p95": self.percentile(95), "max": values[-1]}

    def percentile(self, q: float) -> int:
        """The smallest value with at least q% of the values at or below it."""
        need, seen = q / 100 * sum(self.counts.values()), 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= need:
                return value
        return max(self.counts)

    def histogram(self) -> Dict[int, int]:
        return {value: self.counts[value] for value in sorted(self.counts)}


@dataclass
class TokenCounter:
    tokenizer: SFTTokenizer
    geometry: ImageGeometry

    def count(self, turns: Sequence[dict], images: Sequence[ImageInfo]) -> tuple:
        """(total tokens, image pad tokens) of the sample as the trainer renders it."""
        pads = [image_token_count(i.height, i.width, self.geometry) for i in images]
        encoded = encode_conversation(self.tokenizer, turns, pads)
        return len(encoded.input_ids), sum(pads)


class DatasetStats:
    """Accumulates per-split counts and per-sample distributions."""

    def __init__(self, tokens: Optional[TokenCounter] = None, seq_length: Optional[int] = None):
        self.tokens, self.seq_length = tokens, seq_length
        self.splits: Dict[str, dict] = {}
        self.part_sets, self.part_names = Counter(), Counter()
        self.image_sizes, self.image_formats = Counter(), Counter()
        self.images_per_sample, self.turns = Distribution(), Distribution()
        self.text_chars, self.token_lengths, self.image_tokens = (Distribution(), Distribution(),
                                                                   Distribution())
        self.over_seq_length, self.over_examples = 0, []   # examples: first few "shard:key"

    def add_shard(self, split: str, samples_expected: int, size: int) -> None:
        entry = self.splits.setdefault(split, {"shards": 0, "samples": 0, "bytes": 0,
                                               "samples_expected": 0})
        entry["shards"] += 1
        entry["bytes"] += size
        entry["samples_expected"] += samples_expected

    def add_sample(self, split: str, checked: CheckedSample, parts: Sequence[str]) -> None:
        self.splits[split]["samples"] += 1
        self.part_sets[",".join(sorted(parts))] += 1
        self.part_names.update(parts)
        sample = checked.sample
        if sample is None:
            return
        self.images_per_sample.add(len(sample.image_names))
        self.turns.add(len(sample.conversations))
        self.text_chars.add(sum(len(t["value"]) for t in sample.conversations))
        for info in checked.images:
            self.image_sizes[f"{info.width}x{info.height}"] += 1
            self.image_formats[info.format] += 1
        if self.tokens is not None and len(checked.images) == len(sample.image_names):
            total, pads = self.tokens.count(sample.conversations, checked.images)
            self.token_lengths.add(total)
            self.image_tokens.add(pads)
            if self.seq_length is not None and total > self.seq_length:
                self.over_seq_length += 1
                if len(self.over_examples) < 10:
                    self.over_examples.append(f"{checked.shard}:{checked.key}")

    def as_dict(self) -> dict:
        result = {
            "splits": self.splits,
            "samples": sum(s["samples"] for s in self.splits.values()),
            "parts_per_sample": dict(self.part_sets.most_common()),
            "part_counts": dict(sorted(self.part_names.items())),
            "images": sum(self.image_sizes.values()),
            "images_per_sample": self.images_per_sample.histogram(),
            "image_sizes": dict(self.image_sizes.most_common()),
            "image_formats": dict(self.image_formats.most_common()),
            "turns_per_sample": self.turns.histogram(),
            "text_chars": self.text_chars.summary(),
        }
        if self.tokens is not None:
            result["tokens"] = {
                "total": self.token_lengths.summary(), "image": self.image_tokens.summary(),
                "max_pixels": self.tokens.geometry.max_pixels, "seq_length": self.seq_length,
                "over_seq_length": self.over_seq_length,
                "over_seq_length_examples": self.over_examples,
            }
        return result
