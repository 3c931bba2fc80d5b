"""The synthetic demo dataset: deterministic, well-formed, and its answers match its pixels."""
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from megatron_patch.data.demo_dataset import (CELLS, COLOURS, NUMBER_WORDS, QUESTION_TYPES,
                                              DemoOptions, generate, main)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_hash(root) -> str:
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def images_of(record) -> list:
    image = record.get("image")
    return [] if image is None else image if isinstance(image, list) else [image]


def colours_in(path) -> set:
    """Names of the shape colours whose exact RGB occurs in the image (drawing is not
    anti-aliased, PNG is lossless, backgrounds are not shape colours)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    present = {tuple(p) for p in np.unique(pixels, axis=0)}
    return {name for name, rgb in COLOURS.items() if rgb in present}


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate(DemoOptions(str(tmp_path / name), num_samples=60, seed=seed))
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    assert tree_hash(tmp_path / "a") != tree_hash(tmp_path / "c")


def test_records_are_well_formed_llava(demo_data):
    records = json.loads((demo_data / "demo.json").read_text())
    assert len(records) == 120
    assert len({r["id"] for r in records}) == 120
    kinds = Counter(len(images_of(r)) for r in records)
    assert set(kinds) == {0, 1, 2} and kinds[1] > kinds[2] and kinds[1] > kinds[0]
    seen_types = Counter()
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        tags = sum(t["value"].count("<image>") for t in turns)
        assert tags == len(images_of(record))
        assert all("<image>" not in t["value"] for t in turns[1::2])   # tags in human turns
        assert len(record["question_types"]) == len(turns) // 2
        seen_types.update(record["question_types"])
        for answer in turns[1::2]:
            assert answer["value"] and " " not in answer["value"]      # one-word answers
        for image in images_of(record):
            with Image.open(demo_data / image) as opened:
                assert (opened.format, opened.size) == ("PNG", (56, 56))
    assert set(seen_types) == set(QUESTION_TYPES) - {"describe"}  # off by default


def test_answers_match_the_pixels(demo_data):
    records = json.loads((demo_data / "demo.json").read_text())
    checked = Counter()
    for record in records:
        turns, types, images = record["conversations"], record["question_types"], images_of(record)
        for number, qtype in enumerate(types):
            answer = turns[2 * number + 1]["value"]
            if qtype == "colour":
                assert answer in colours_in(demo_data / images[0])
            elif qtype == "count":
                assert NUMBER_WORDS.index(answer) == len(colours_in(demo_data / images[0]))
            elif qtype == "multi_image" and number == 0:
                colour = turns[0]["value"].split("has a ")[1].split(" ")[0]
                has = [colour in colours_in(demo_data / image) for image in images]
                assert has == ([True, False] if answer == "first" else [False, True])
            else:
                continue
            checked[qtype] += 1
    assert checked["colour"] > 5 and checked["count"] > 5 and checked["multi_image"] > 5


def colour_cells(path) -> dict:
    """colour name -> the 2x2 cell holding its pixels."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    half = pixels.shape[0] // 2
    found = {}
    for name, rgb in COLOURS.items():
        rows, cols = np.nonzero((pixels == rgb).all(axis=-1))
        if len(rows):
            found[name] = CELLS[2 * int(rows[0] >= half) + int(cols[0] >= half)]
    return found


def test_descriptions_name_every_shape_in_reading_order(tmp_path):
    records = generate(DemoOptions(str(tmp_path), num_samples=40, seed=2, describe=1.0))
    described = 0
    for record in records:
        if record["question_types"][0] != "describe":
            continue
        assert record["conversations"][0]["value"] == "<image>\nDescribe the image."
        items = [item.split(" ") for item in record["conversations"][1]["value"].split(", ")]
        cells = colour_cells(tmp_path / record["image"])
        assert {colour: cell for colour, _, cell in items} == cells
        order = [CELLS.index(cell) for _, _, cell in items]
        assert order == sorted(CELLS.index(cell) for cell in cells.values())
        assert len({kind for _, kind, _ in items}) == len(items)
        described += 1
    assert described == sum(isinstance(r.get("image"), str) for r in records) > 20


def test_first_stage_options_give_lone_shapes_and_only_the_asked_questions(tmp_path):
    """--max-shapes 1 --questions colour,shape --single-image-only: one shape per image (seen in
    the pixels), one image per record, and only colour/shape questions, each answered right."""
    assert main(["--output-dir", str(tmp_path), "--num-samples", "60", "--seed", "5",
                 "--max-shapes", "1", "--questions", "colour,shape", "--single-image-only"]) == 0
    records = json.loads((tmp_path / "demo.json").read_text())
    assert len(records) == 60
    asked = Counter()
    for record in records:
        assert isinstance(record["image"], str)
        (colour,) = colours_in(tmp_path / record["image"])
        for qtype, (question, answer) in zip(record["question_types"],
                                             zip(record["conversations"][::2],
                                                 record["conversations"][1::2])):
            asked[qtype] += 1
            if qtype == "colour":
                assert answer["value"] == colour
            else:
                assert question["value"].endswith(f"What shape is the {colour} object?")
    assert set(asked) == {"colour", "shape"} and min(asked.values()) > 10


@pytest.mark.parametrize("options, message", [
    (dict(max_shapes=4), "--max-shapes 4: use 1 to 3"),
    (dict(questions=("colour", "size")), "--questions colour,size: choose from"),
    (dict(questions=()), "--questions : choose from"),
])
def test_bad_first_stage_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        generate(DemoOptions(str(tmp_path), num_samples=2, **options))


def test_two_thousand_samples_in_seconds(tmp_path):
    started = time.perf_counter()
    records = generate(DemoOptions(str(tmp_path / "big"), num_samples=2000, seed=0))
    seconds = time.perf_counter() - started
    assert len(records) == 2000
    assert seconds < 15, f"demo generation took {seconds:.1f} s"


def test_cli_and_tool_script(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "m"), "--num-samples", "7", "--seed", "1"]) == 0
    assert "wrote 7 samples" in capsys.readouterr().out
    assert main(["--output-dir", str(tmp_path / "bad"), "--image-size", "50"]) == 2
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_demo_dataset.py"),
                           "--output-dir", str(tmp_path / "t"), "--num-samples", "7", "--seed",
                           "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert tree_hash(tmp_path / "m") == tree_hash(tmp_path / "t")


@pytest.mark.parametrize("split", ["train", "val"])
def test_converter_takes_every_demo_record(converted_demo, split):
    manifest = json.loads((converted_demo / ".nv-meta" / "llava_manifest.json").read_text())
    assert manifest["samples"] == {"train": 108, "val": 12, "test": 0}
    report = json.loads((converted_demo / "conversion_report.json").read_text())
    assert report["skipped"] == 0
    assert report["samples"][split] == manifest["samples"][split]
