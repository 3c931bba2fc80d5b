"""The dataset inspector: statistics equal what was written, every fault named, show/html/json."""
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
from PIL import Image

from megatron_patch.data.energon_reader import decode_images, iter_split_samples
from megatron_patch.data.image_processing import ImageGeometry
from megatron_patch.data.inspect_cli import main
from megatron_patch.data.sft_sample import encode_sample
from megatron_patch.data.tokenizer import SFTTokenizer, build_tiny_tokenizer
from tar_damage import overwrite_member

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN, VAL = "subtaskdata-00000.tar", "subtaskdata-00001.tar"


def inspect(capsys, *args):
    """(exit code, stats dict) of `inspect --json`."""
    rc = main([*map(str, args), "--json", "--no-progress"])
    return rc, json.loads(capsys.readouterr().out)


def problems_text(stats) -> str:
    return "\n".join(f"{p['shard']}:{p['key']}: {p['message']}" for p in stats["problem_list"])


def demo_records(demo_data):
    return json.loads((demo_data / "demo.json").read_text())


def n_images(record) -> int:
    image = record.get("image")
    return 0 if image is None else len(image) if isinstance(image, list) else 1


def keys_with_parts(tar_path, parts: int) -> list:
    """Sample keys of a tar having exactly `parts` members, in order."""
    with tarfile.open(tar_path) as tar:
        counts = Counter(m.name.split(".")[0] for m in tar.getmembers())
    return [key for key, count in counts.items() if count == parts]


def test_statistics_equal_what_was_written(converted_demo, demo_data, capsys):
    records = demo_records(demo_data)
    rc, stats = inspect(capsys, converted_demo)
    assert rc == 0 and stats["problems"] == 0 and stats["problem_list"] == []
    assert stats["samples"] == 120
    for split, name, samples in (("train", TRAIN, 108), ("val", VAL, 12)):
        assert stats["splits"][split] == {
            "shards": 1, "samples": samples, "samples_expected": samples,
            "bytes": os.path.getsize(converted_demo / name)}
    images = Counter(n_images(r) for r in records)
    assert stats["images_per_sample"] == {str(k): v for k, v in sorted(images.items())}
    total_images = sum(n_images(r) for r in records)
    assert stats["images"] == total_images
    assert stats["image_sizes"] == {"56x56": total_images}
    assert stats["image_formats"] == {"PNG": total_images}
    parts = {"json": images[0], "img0.png,json": images[1], "img0.png,img1.png,json": images[2]}
    assert stats["parts_per_sample"] == {k: v for k, v in parts.items() if v}
    assert stats["part_counts"] == {"img0.png": images[1] + images[2], "img1.png": images[2],
                                    "json": 120}
    turns = Counter(len(r["conversations"]) for r in records)
    assert stats["turns_per_sample"] == {str(k): v for k, v in sorted(turns.items())}
    chars = [sum(len(t["value"]) for t in r["conversations"]) for r in records]
    assert (stats["text_chars"]["min"], stats["text_chars"]["max"]) == (min(chars), max(chars))
    assert stats["text_chars"]["mean"] == round(sum(chars) / len(chars), 2)


def test_split_choice(converted_demo, capsys):
    rc, stats = inspect(capsys, converted_demo, "--split", "val")
    assert rc == 0 and list(stats["splits"]) == ["val"] and stats["samples"] == 12
    assert main([str(converted_demo), "--split", "nope", "--no-progress"]) == 2
    assert "not in the dataset" in capsys.readouterr().err


def test_token_lengths_are_what_the_trainer_encodes(converted_demo, demo_data, tmp_path, capsys):
    texts = [t["value"] for r in demo_records(demo_data) for t in r["conversations"]]
    tokenizer_dir = build_tiny_tokenizer(str(tmp_path / "tok"), texts, vocab_size=400)
    tokenizer = SFTTokenizer(tokenizer_dir)
    lengths = sorted(
        encode_sample(tokenizer, s.conversations, decode_images(s), ImageGeometry(),
                      seq_length=1 << 20).length
        for s in iter_split_samples(converted_demo, "val"))
    limit = lengths[len(lengths) // 2]
    rc, stats = inspect(capsys, converted_demo, "--split", "val", "--tokenizer", tokenizer_dir,
                        "--seq-length", limit)
    tokens = stats["tokens"]
    assert rc == 0
    assert (tokens["total"]["min"], tokens["total"]["max"]) == (lengths[0], lengths[-1])
    assert tokens["total"]["count"] == 12
    assert tokens["over_seq_length"] == sum(n > limit for n in lengths) > 0
    assert len(tokens["over_seq_length_examples"]) == tokens["over_seq_length"]
    assert tokens["image"]["max"] in (4, 8)          # a 56x56 image is 2x2 = 4 image tokens
    # a smaller pixel budget shrinks each 56x56 image to 28x28: one token
    rc, small = inspect(capsys, converted_demo, "--split", "val", "--tokenizer", tokenizer_dir,
                        "--max-pixels", 28 * 28)
    assert small["tokens"]["image"]["max"] == tokens["image"]["max"] // 4
    assert main([str(converted_demo), "--seq-length", "10", "--no-progress"]) == 2


def test_validate_passes_a_clean_dataset(converted_demo, capsys):
    rc = main([str(converted_demo), "--validate", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "no problems found" in out and "train" in out and "108 samples" in out


def test_validate_names_every_bad_sample_and_shard(converted_copy, demo_tokenizer, capsys):
    train = converted_copy / TRAIN
    rotten_image, broken_json, wrong_tags, too_thin = keys_with_parts(train, 2)[2:6]
    thin = io.BytesIO()
    Image.new("RGB", (2010, 10)).save(thin, format="PNG")  # over the vision tower's 200:1
    # the same length (PIL reads up to the PNG's end chunk and ignores what follows)
    overwrite_member(train, f"{too_thin}.img0.png",
                     lambda d: thin.getvalue() + bytes(len(d) - len(thin.getvalue())))
    # bit rot inside a PNG: the header still parses, the chunk checksum does not
    overwrite_member(train, f"{rotten_image}.img0.png",
                     lambda d: d[:60] + bytes(16) + d[76:])
    overwrite_member(train, f"{broken_json}.json", lambda d: b"X" + d[1:])
    overwrite_member(train, f"{wrong_tags}.json", lambda d: d.replace(b"<image>", b"<imagX>"))
    val = converted_copy / VAL
    with tarfile.open(val) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    os.truncate(val, middle.offset_data + middle.size // 2)  # inside a member's data

    rc, quick = inspect(capsys, converted_copy)
    assert rc == 1
    text = problems_text(quick)
    assert f"{TRAIN}:{broken_json}: 'json' part is not valid JSON" in text
    assert f"{TRAIN}:{wrong_tags}: 0 <image> tag(s) but 1 image(s)" in text
    assert f"{VAL}:: unreadable tar" in text and f"{VAL}:: size" in text
    assert rotten_image not in text                  # headers only without --validate
    assert (f"{TRAIN}:{too_thin}: image img0.png is 2010x10, over 200:1: too thin for the "
            "vision tower (the trainer skips the sample as bad)") in text
    # token counts pass over it (the inspector stopped with 'too thin to patch', naming nothing)
    rc, counted = inspect(capsys, converted_copy, "--tokenizer", demo_tokenizer)
    assert rc == 1 and too_thin in problems_text(counted)

    rc, full = inspect(capsys, converted_copy, "--validate")
    assert rc == 1
    text = problems_text(full)
    assert f"{TRAIN}:{rotten_image}: image img0.png does not decode" in text
    for fragment in (broken_json, wrong_tags, f"{VAL}:: unreadable tar", f"{VAL}:: size"):
        assert fragment in text
    assert text.count(broken_json) == 1              # energon's pass does not repeat it
    # the readable summary names them too
    assert main([str(converted_copy), "--validate", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS" in out and rotten_image in out and VAL in out


def test_manifest_and_index_faults(converted_copy, capsys):
    os.remove(str(converted_copy / VAL) + ".idx")
    with open(converted_copy / TRAIN, "ab") as handle:
        handle.write(bytes(10240))                   # a tar grown after conversion
    rc, stats = inspect(capsys, converted_copy, "--split", "train")
    text = problems_text(stats)
    assert rc == 1
    assert f"{VAL}:: missing {VAL}.idx" in text      # the index is checked for every split
    assert f"{TRAIN}:: size {os.path.getsize(converted_copy / TRAIN)} bytes, manifest says" in text
    os.remove(converted_copy / VAL)
    os.remove(converted_copy / ".nv-meta" / "llava_manifest.json")
    rc, stats = inspect(capsys, converted_copy, "--split", "train")
    text = problems_text(stats)
    assert f"{VAL}:: missing tar (listed in split 'val')" in text
    assert "no .nv-meta/llava_manifest.json" in text


def test_show_and_html(converted_demo, tmp_path, capsys):
    page = tmp_path / "page.html"
    rc = main([str(converted_demo), "--show", "3", "--html", str(page), "--no-progress"])
    out = capsys.readouterr().out
    first = []
    for sample in iter_split_samples(converted_demo, "train"):
        first.append(sample)
        if len(first) == 3:
            break
    assert rc == 0
    assert out.count(f"--- {TRAIN}:") == 3
    for sample in first:
        assert f"{TRAIN}:{sample.__key__}" in out
        assert f"ASSISTANT: {sample.conversations[1]['value']}" in out
    html = page.read_text()
    assert html.count("<img ") == sum(len(s.images) for s in first)
    assert html.count("data:image/png;base64,") == html.count("<img ")
    assert html.count("<section>") == 3


def test_tool_script_prints_json(converted_demo):
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "inspect_webdataset.py"),
                           str(converted_demo), "--json", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"] == 120


@pytest.mark.parametrize("missing", ["dir"])
def test_not_a_directory(tmp_path, missing, capsys):
    assert main([str(tmp_path / missing), "--no-progress"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_blend_names_its_dataset_folders(tmp_path, capsys):
    """The trainer's data errors on a blend point at its members; so does the inspector."""
    blend = tmp_path / "blend.yaml"
    blend.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n"
                     "  train:\n    blend:\n      - weight: 3\n        path: ./a\n"
                     "      - weight: 1\n        path: ./b\n"
                     "  val:\n    blend:\n      - path: ./a\n      - path: ./c\n")
    assert main([str(blend), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: {blend} is a blend: inspect each dataset folder it names ({tmp_path / 'a'}, "
        f"{tmp_path / 'b'}, {tmp_path / 'c'})\n")


def test_many_shards_brace_collapsed_in_split_yaml(demo_data, tmp_path, capsys):
    from megatron_patch.data.convert_cli import main as convert_main
    out = tmp_path / "ds"
    assert convert_main([str(demo_data / "demo.json"), "--image-root", str(demo_data),
                         "--output-dir", str(out), "--split", "90,10", "--workers", "1",
                         "--max-samples-per-shard", "25", "--no-progress"]) == 0
    capsys.readouterr()
    assert "{" in (out / ".nv-meta" / "split.yaml").read_text()   # energon collapsed the names
    rc, stats = inspect(capsys, out, "--validate")
    assert rc == 0, problems_text(stats)
    assert {s: (v["shards"], v["samples"]) for s, v in stats["splits"].items()} == \
        {"train": (5, 108), "val": (1, 12)}
    ids = [s.id for s in iter_split_samples(out, "train")]
    assert len(set(ids)) == 108 and ids == sorted(ids)       # across shards, in order


def test_tars_without_an_index_are_still_counted(converted_copy, capsys):
    import shutil
    shutil.rmtree(converted_copy / ".nv-meta")
    rc, stats = inspect(capsys, converted_copy)
    assert rc == 1
    assert stats["splits"]["unindexed"]["samples"] == 120
    assert "no .nv-meta/split.yaml: not an energon dataset" in problems_text(stats)


def test_show_escapes_control_characters():
    """A NUL or a carriage return in a conversation garbled the terminal; CJK and tabs stay."""
    from megatron_patch.data.energon_reader import LlavaSftSample
    from megatron_patch.data.inspect_render import format_sample
    from megatron_patch.data.sample_check import CheckedSample
    sample = LlavaSftSample(__key__="k", __restore_key__=(), id="r1", image_names=[], images=[],
                            conversations=[{"from": "human", "value": "a\x00b\r\nc\td 中文"},
                                           {"from": "gpt", "value": "ok"}])
    shown = format_sample(CheckedSample("s.tar", "k", sample))
    assert "a\\x00b\\r\n    c\td 中文" in shown and "\x00" not in shown and "\r" not in shown
