"""Greedy-decoding VQA evaluation: exact-match accuracy per question type on a converted split.

The question a user asks after a demo or an SFT run is "did it learn the task?", not "did the loss
go down?". This answers it on any converted dataset whose records carry `question_types` (one per
user turn, as the demo's do; other datasets are scored under the type "all"): for each user turn
the model sees the conversation up to that turn, generates greedily until `<|im_end|>`, and the
answer counts when it equals the reference after normalisation (case, surrounding punctuation).

Decoding re-runs the full sequence per new token (no KV cache): answers are a few tokens long and
this keeps the evaluator on the model's training forward path, at any size that fits one device.
"""
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_patch.data.chat_template import encode_conversation
from megatron_patch.data.energon_reader import LlavaSftSample, decode_images, iter_split_samples
from megatron_patch.data.image_processing import ImageGeometry, image_to_patches
from megatron_patch.data.shard_format import IMAGE_TAG, ROLE_ASSISTANT, ROLE_USER
from megatron_patch.data.tokenizer import SFTTokenizer

DEFAULT_TYPE = "all"


def normalise(text: str) -> str:
    return re.sub(r"^[\W_]+|[\W_]+$", "", text.strip().lower())


@dataclass
class Question:
    key: str
    question_type: str
    turns: List[dict]             # the conversation up to and including the user turn
    images: List                  # PIL images referenced by those turns, in order
    answer: str


@dataclass
class Scores:
    correct: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: List[Tuple[str, str, str, str]] = field(default_factory=list)  # key, type, ref, got

    def add(self, question: Question, prediction: str) -> None:
        self.total[question.question_type] += 1
        if normalise(prediction) == normalise(question.answer):
            self.correct[question.question_type] += 1
        elif len(self.examples) < 20:
            self.examples.append((question.key, question.question_type, question.answer, prediction))

    def accuracy(self) -> Dict[str, float]:
        result = {kind: self.correct[kind] / self.total[kind] for kind in sorted(self.total)}
        overall = sum(self.total.values())
        result["overall"] = sum(self.correct.values()) / overall if overall else 0.0
        return result

    def table(self) -> str:
        lines = [f"{'question type':<14} {'correct':>8} {'total':>6} {'accuracy':>9}"]
        typed = set(self.total) != {DEFAULT_TYPE}  # untyped data: the overall row says it all
        for kind in sorted(self.total) if typed else ():
            lines.append(f"{kind:<14} {self.correct[kind]:>8} {self.total[kind]:>6} "
                         f"{self.correct[kind] / self.total[kind]:>9.1%}")
        total = sum(self.total.values())
        lines.append(f"{'overall':<14} {sum(self.correct.values()):>8} {total:>6} "
                     f"{self.accuracy()['overall']:>9.1%}")
        return "\n".join(lines)


def questions(sample: LlavaSftSample) -> Iterator[Question]:
    """One question per user turn that an assistant turn answers."""
    types = list(sample.meta.get("question_types") or [])
    images = decode_images(sample)
    used_images, asked = 0, 0
    turns = sample.conversations
    for index, turn in enumerate(turns):
        if turn["from"] != ROLE_USER:
            continue
        used_images += turn["value"].count(IMAGE_TAG)
        if index + 1 < len(turns) and turns[index + 1]["from"] == ROLE_ASSISTANT:
            kind = types[asked] if asked < len(types) else DEFAULT_TYPE
            yield Question(sample.__key__, kind, turns[:index + 1], images[:used_images],
                           turns[index + 1]["value"])
        asked += 1


class GreedyAnswerer:
    """Greedy generation with an LlavaOVModel (TP=PP=1) on one device."""

    def __init__(self, model, tokenizer: SFTTokenizer, geometry: ImageGeometry,
                 device: torch.device, max_new_tokens: int = 16):
        self.model, self.tokenizer, self.geometry = model, tokenizer, geometry
        self.device, self.max_new_tokens = device, max_new_tokens

    @torch.no_grad()
    def answer(self, turns: Sequence[dict], images: Sequence) -> str:
        patches, grids = [], []
        for image in images:
            image_patches, grid = image_to_patches(image, self.geometry)
            patches.append(image_patches)
            grids.append(grid)
        counts = [t * h * w // self.geometry.merge_size ** 2 for t, h, w in grids]
        ids = encode_conversation(self.tokenizer, turns, counts, add_generation_prompt=True).input_ids
        pixel_values = torch.cat(patches).to(self.device) if patches else None
        grid_thw = torch.tensor(grids, dtype=torch.long, device=self.device) if grids else None
        generated: List[int] = []
        for _ in range(self.max_new_tokens):
            tokens = torch.tensor([ids + generated], device=self.device)
            positions = torch.arange(tokens.shape[1], device=self.device).unsqueeze(0)
            logits = self.model(tokens, positions, pixel_values=pixel_values,
                                image_grid_thw=grid_thw)
            next_id = int(logits[0, -1].argmax())
            if next_id in (self.tokenizer.im_end_id, self.tokenizer.eod_id):
                break
            generated.append(next_id)
        return self.tokenizer.decode(generated)


def evaluate(answerer: GreedyAnswerer, data_path: str, split: str = "val",
             limit: Optional[int] = None) -> Scores:
    scores = Scores()
    for sample in iter_split_samples(data_path, split):
        for question in questions(sample):
            scores.add(question, answerer.answer(question.turns, question.images))
            if limit and sum(scores.total.values()) >= limit:
                return scores
    return scores
