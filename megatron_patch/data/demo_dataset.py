"""A synthetic visual question answering dataset that a tiny model can learn on a CPU in minutes.

Why synthetic: the demo and the tests must run offline, and a loss curve only proves something if
the task is learnable and the answers are checkable. Every image shows 1-3 coloured shapes
(circle, square, triangle) in distinct cells of a 2x2 grid on a plain light background; within one
image colours and shape kinds are all different, so "the red shape" or "the circle" always names
exactly one object. Questions have one-word answers (descriptions aside), so accuracy per
question type is a clear signal for a later evaluator:

    colour      "What colour is the circle?"            -> "red"
    shape       "What shape is the blue object?"        -> "square"
    count       "How many shapes are there?"            -> "two"
    position    "Where is the green triangle?"          -> "top-left"
    multi_image two images: "Which image has a red shape?" -> "first" | "second"
    text        no image: "How many sides does a triangle have?" -> "three"
    describe    (opt-in, --describe) "Describe the image." -> "red circle top-left, blue square
                bottom-right": every attribute of every shape, in reading order

Output is LLaVA JSON (`demo.json`, a list) plus PNGs under `images/`, the converter's input format.
Each record keeps `question_types` (one per human turn) for scoring accuracy per type. The same
seed gives byte-identical files: one `random.Random(seed)` drives everything, in record order.
"""
import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
BACKGROUNDS = ((255, 255, 255), (225, 225, 225), (245, 240, 225), (215, 230, 240))
SHAPES = ("circle", "square", "triangle")
CELLS = ("top-left", "top-right", "bottom-left", "bottom-right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("colour", "shape", "count", "position", "multi_image", "text", "describe")
IMAGE_QUESTIONS = ("colour", "shape", "count", "position")  # asked about a single image
IMAGE_DIR = "images"
JSON_NAME = "demo.json"
# share of records with one image, two images, no image
MIX = (("single", 0.70), ("multi", 0.15), ("text", 0.15))


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: str


@dataclass
class DemoOptions:
    output_dir: str
    num_samples: int = 2000
    seed: int = 0
    image_size: int = 56
    describe: float = 0.0   # share of single-image records that start with "Describe the image."
    # Curriculum and diagnostic knobs (defaults: the full mix), e.g. lone shapes asked only
    # their kind, to see whether one read-out is learned at all (docs/BENCHMARKS.md, session 13)
    max_shapes: int = 3                              # shapes per image: 1..max_shapes
    questions: Tuple[str, ...] = IMAGE_QUESTIONS     # what single-image records ask
    single_image_only: bool = False                  # no two-image and no text-only records


# ---------------------------------------------------------------- entry point


def generate(options: DemoOptions) -> List[dict]:
    """Writes `demo.json` and `images/*.png` under `output_dir`; returns the records."""
    if options.image_size % 28 or options.image_size < 56:
        raise ValueError(f"--image-size {options.image_size}: use a multiple of 28, at least 56 "
                         "(a 2x2 grid of cells; one image token per 28x28 pixels)")
    if not 1 <= options.max_shapes <= len(SHAPES):
        raise ValueError(f"--max-shapes {options.max_shapes}: use 1 to {len(SHAPES)} (kinds are "
                         "distinct within an image)")
    if not options.questions or set(options.questions) - set(IMAGE_QUESTIONS):
        raise ValueError(f"--questions {','.join(options.questions)}: choose from "
                         f"{','.join(IMAGE_QUESTIONS)}")
    rng = random.Random(options.seed)
    os.makedirs(os.path.join(options.output_dir, IMAGE_DIR), exist_ok=True)
    records = []
    for index in range(options.num_samples):
        kind = "single" if options.single_image_only else _pick_kind(rng)
        builder = {"single": _single_image_record, "multi": _multi_image_record,
                   "text": _text_record}[kind]
        records.append(builder(rng, index, options))
    with open(os.path.join(options.output_dir, JSON_NAME), "w", encoding="utf-8") as handle:
        json.dump(records, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
    return records


def _pick_kind(rng: random.Random) -> str:
    roll, total = rng.random(), 0.0
    for kind, share in MIX:
        total += share
        if roll < total:
            return kind
    return MIX[-1][0]


# ---------------------------------------------------------------- records


def _single_image_record(rng: random.Random, index: int, options: DemoOptions) -> dict:
    shapes = _random_scene(rng, rng.randint(1, options.max_shapes))
    name = _write_image(rng, shapes, index, 0, options)
    questions = list(options.questions)
    types = rng.sample(questions, rng.randint(1, min(3, len(questions))))
    if options.describe and rng.random() < options.describe:
        types.insert(0, "describe")
    turns = []
    for number, qtype in enumerate(types):
        question, answer = _ask(rng, qtype, shapes)
        turns += [{"from": "human", "value": ("<image>\n" if number == 0 else "") + question},
                  {"from": "gpt", "value": answer}]
    return {"id": f"demo_{index:06d}", "image": name, "conversations": turns,
            "question_types": types}


def _ask(rng: random.Random, qtype: str, shapes: Sequence[Shape]) -> Tuple[str, str]:
    if qtype == "describe":  # every attribute of every shape, in reading order of the cells
        ordered = sorted(shapes, key=lambda shape: CELLS.index(shape.cell))
        return "Describe the image.", ", ".join(f"{s.colour} {s.kind} {s.cell}" for s in ordered)
    target = rng.choice(shapes)
    if qtype == "colour":
        return f"What colour is the {target.kind}?", target.colour
    if qtype == "shape":
        return f"What shape is the {target.colour} object?", target.kind
    if qtype == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(shapes)]
    return f"Where is the {target.colour} {target.kind}?", target.cell


def _multi_image_record(rng: random.Random, index: int, options: DemoOptions) -> dict:
    """Two images; exactly one of them holds a shape of the asked colour."""
    colour = rng.choice(sorted(COLOURS))
    with_colour = _random_scene(rng, rng.randint(1, 3), must_colour=colour)
    without = _random_scene(rng, rng.randint(1, 3), avoid_colour=colour)
    first_has_it = rng.random() < 0.5
    scenes = (with_colour, without) if first_has_it else (without, with_colour)
    names = [_write_image(rng, scene, index, i, options) for i, scene in enumerate(scenes)]
    turns = [{"from": "human", "value": f"<image>\n<image>\nWhich image has a {colour} shape?"},
             {"from": "gpt", "value": "first" if first_has_it else "second"}]
    types = ["multi_image"]
    if rng.random() < 0.5:
        which = rng.randrange(2)
        turns += [{"from": "human",
                   "value": f"How many shapes are in the {('first', 'second')[which]} image?"},
                  {"from": "gpt", "value": NUMBER_WORDS[len(scenes[which])]}]
        types.append("multi_image")
    return {"id": f"demo_{index:06d}", "image": names, "conversations": turns,
            "question_types": types}


def _text_record(rng: random.Random, index: int, options: DemoOptions) -> dict:
    """Text-only questions from the same small world, so text and vision share a vocabulary."""
    types, turns = [], []
    for _ in range(rng.randint(1, 2)):
        question, answer = _text_question(rng)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        types.append("text")
    return {"id": f"demo_{index:06d}", "conversations": turns, "question_types": types}


def _text_question(rng: random.Random) -> Tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        shape = rng.choice(("triangle", "square"))
        return f"How many sides does a {shape} have?", ("three" if shape == "triangle" else "four")
    if kind == 1:
        n = rng.randint(0, 8)
        return f"What number comes after {NUMBER_WORDS[n]}?", NUMBER_WORDS[n + 1]
    if kind == 2:
        word, opposite = rng.choice((("left", "right"), ("right", "left"),
                                     ("top", "bottom"), ("bottom", "top")))
        return f"What is the opposite of {word}?", opposite
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    return f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b]


# ---------------------------------------------------------------- images


def _random_scene(rng: random.Random, count: int, must_colour: str = None,
                  avoid_colour: str = None) -> List[Shape]:
    colours = [c for c in sorted(COLOURS) if c not in (must_colour, avoid_colour)]
    chosen = rng.sample(colours, count - (must_colour is not None))
    if must_colour is not None:
        chosen.insert(rng.randrange(count), must_colour)
    kinds = rng.sample(SHAPES, count)
    cells = rng.sample(CELLS, count)
    return [Shape(kind, colour, cell) for kind, colour, cell in zip(kinds, chosen, cells)]


def _write_image(rng: random.Random, shapes: Sequence[Shape], index: int, position: int,
                 options: DemoOptions) -> str:
    size = options.image_size
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    half = size // 2
    for shape in shapes:
        row, col = divmod(CELLS.index(shape.cell), 2)
        extent = int(half * rng.uniform(0.55, 0.8))
        left = col * half + rng.randint(1, half - extent - 1)
        top = row * half + rng.randint(1, half - extent - 1)
        _draw_shape(draw, shape, (left, top, left + extent, top + extent))
    relative = f"{IMAGE_DIR}/{index:06d}_{position}.png"
    # fixed compression settings: the PNG bytes depend only on the pixels (determinism)
    image.save(os.path.join(options.output_dir, relative), format="PNG", compress_level=6)
    return relative


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, box: Tuple[int, int, int, int]) -> None:
    fill = COLOURS[shape.colour]
    left, top, right, bottom = box
    if shape.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)


def image_paths(record: dict) -> List[str]:
    """The record's image paths (relative to the output dir), whatever the `image` shape."""
    image = record.get("image")
    return [] if image is None else list(image) if isinstance(image, list) else [image]


def build_demo_tokenizer(records: Sequence[dict], out_dir: str, vocab_size: int = 512) -> str:
    """A BPE tokenizer (tokenizer.json, Qwen special tokens) trained on the records' texts and the
    default system prompt: the tiny model's 512-entry vocabulary, built offline in a second."""
    from megatron_patch.data.chat_template import DEFAULT_SYSTEM_PROMPT
    from megatron_patch.data.tokenizer import build_tiny_tokenizer
    texts = [turn["value"] for record in records for turn in record["conversations"]]
    return build_tiny_tokenizer(out_dir, texts + [DEFAULT_SYSTEM_PROMPT], vocab_size)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a deterministic synthetic VQA dataset (coloured shapes, one-word "
                    "answers) as LLaVA JSON + PNG images, for the CPU demo and tests.")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=56,
                   help="image side in pixels, a multiple of 28 (default 56: 4 image tokens)")
    p.add_argument("--describe", type=float, default=0.0,
                   help="share of single-image records that first ask for a full description "
                        "(colour, shape and cell of every shape): dense supervision")
    p.add_argument("--max-shapes", type=int, default=3,
                   help="at most this many shapes per image (1-3; 1 = lone shapes)")
    p.add_argument("--questions", default=",".join(IMAGE_QUESTIONS),
                   help="comma-separated question types for single-image records "
                        f"(default {','.join(IMAGE_QUESTIONS)})")
    p.add_argument("--single-image-only", action="store_true",
                   help="only single-image records (no two-image, no text-only ones)")
    p.add_argument("--tokenizer-dir", help="also train a 512-token tokenizer on the texts here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        records = generate(DemoOptions(
            args.output_dir, args.num_samples, args.seed, args.image_size, args.describe,
            args.max_shapes, tuple(q for q in args.questions.split(",") if q),
            args.single_image_only))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    images = sum(len(image_paths(r)) for r in records)
    print(f"wrote {len(records)} samples with {images} images to "
          f"{os.path.join(args.output_dir, JSON_NAME)} in {time.perf_counter() - started:.1f} s")
    if args.tokenizer_dir:
        build_demo_tokenizer(records, args.tokenizer_dir)
        print(f"wrote a 512-token tokenizer to {args.tokenizer_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
