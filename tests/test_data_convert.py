"""The converter: every good record comes back equal, every bad one is skipped and reported."""
import base64
import io
import json
import os
import struct
import tarfile
import zlib

import pytest
import yaml
from braceexpand import braceexpand
from PIL import Image

from megatron_patch.data import convert as convert_module
from megatron_patch.data.convert import SplitAssigner
from megatron_patch.data.convert_cli import EXIT_SKIPPED, main as convert_main


def image_bytes(color, size=(28, 28), fmt="PNG"):
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)
    return path


def turn(role, text):
    return {"from": role, "value": text}


def read_shards(out_dir):
    """{key: {part: bytes}} over every tar in the dir, plus {key: shard name}."""
    samples, where = {}, {}
    for name in sorted(n for n in os.listdir(out_dir) if n.endswith(".tar")):
        with tarfile.open(os.path.join(out_dir, name)) as tar:
            for member in tar.getmembers():
                key, part = member.name.split(".", 1)
                samples.setdefault(key, {})[part] = tar.extractfile(member).read()
                where[key] = name
    return samples, where


def samples_by_id(out_dir):
    samples, _ = read_shards(out_dir)
    result = {}
    for parts in samples.values():
        record = json.loads(parts["json"])
        result[record["id"]] = (record, {n: parts[n] for n in record["images"]})
    return result


def skipped(out_dir):
    with open(os.path.join(out_dir, "skipped.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture
def llava_input(tmp_path):
    """Five good records: one image, two images, text only, system prompt, untagged image."""
    root = tmp_path / "imgs"
    red, green_jpg = image_bytes((255, 0, 0)), image_bytes((0, 255, 0), (40, 30), "JPEG")
    write(str(root / "red.png"), red)
    write(str(root / "green.jpg"), green_jpg)
    write(str(root / "disguised.png"), green_jpg)  # a JPEG behind a .png name
    records = [
        {"id": "one", "image": "red.png", "conversations": [turn("human", "<image>\nColour?"), turn("gpt", "red")]},
        {"id": "two", "image": ["red.png", "green.jpg"], "conversations": [
            turn("human", "<image><image>\nWhich is green?"), turn("gpt", "second"),
            turn("human", "And red?"), turn("gpt", "first")]},
        {"id": "text", "conversations": [turn("human", "2+2?"), turn("gpt", "4")]},
        {"id": "sys", "image": "disguised.png", "conversations": [
            turn("system", "Be brief."), turn("human", "<image> colour"), turn("gpt", "green")]},
        {"id": "untagged", "image": "red.png", "source_dataset": "demo",
         "conversations": [turn("human", "What colour?"), turn("gpt", "red")]},
    ]
    path = write(str(tmp_path / "data.json"), json.dumps(records))
    return path, str(root), records, {"red": red, "green": green_jpg}


def test_round_trip_keeps_text_and_image_bytes(llava_input, tmp_path):
    path, root, records, pixels = llava_input
    out = str(tmp_path / "out")
    assert convert_main([path, "--image-root", root, "--output-dir", out, "--workers", "1",
                         "--no-progress"]) == 0
    converted = samples_by_id(out)
    assert set(converted) == {r["id"] for r in records}
    for record in records:
        got, images = converted[record["id"]]
        expected_turns = record["conversations"]
        if record["id"] == "untagged":  # the documented policy: tags prepended to the first turn
            expected_turns = [turn("human", "<image>\nWhat colour?"), turn("gpt", "red")]
        assert got["conversations"] == expected_turns
        assert sum(t["value"].count("<image>") for t in got["conversations"]) == len(images)
    assert converted["two"][1] == {"img0.png": pixels["red"], "img1.jpg": pixels["green"]}
    # the extension follows the bytes, not the file name
    assert converted["sys"][1] == {"img0.jpg": pixels["green"]}
    assert converted["untagged"][0]["meta"] == {"source_dataset": "demo"}
    assert converted["text"][1] == {}
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    assert report["image_tags_prepended"] == 1 and report["images"] == 5 and report["skipped"] == 0


def test_energon_index_lists_every_shard_by_split(llava_input, tmp_path):
    path, root, _, _ = llava_input
    out = str(tmp_path / "out")
    convert_main([path, "--image-root", root, "--output-dir", out, "--split", "60,40",
                  "--max-samples-per-shard", "2", "--no-progress"])
    meta = os.path.join(out, ".nv-meta")
    assert yaml.safe_load(open(os.path.join(meta, "dataset.yaml")))["__class__"] == "CrudeWebdataset"
    split = {name: [shard for pattern in parts for shard in braceexpand(pattern)]  # energon collapses
             for name, parts in yaml.safe_load(open(os.path.join(meta, "split.yaml")))["split_parts"].items()}
    manifest = json.load(open(os.path.join(meta, "llava_manifest.json")))
    _, where = read_shards(out)
    # 5 samples at 60:40 -> 3 train (2 shards of <=2) + 2 val (1 shard), train shards first
    assert manifest["samples"] == {"train": 3, "val": 2, "test": 0}
    assert split["train"] == ["subtaskdata-00000.tar", "subtaskdata-00001.tar"]
    assert split["val"] == ["subtaskdata-00002.tar"]
    for name, info in manifest["shards"].items():
        assert info["bytes"] == os.path.getsize(os.path.join(out, name))
        assert info["samples"] == sum(1 for shard in where.values() if shard == name)
        assert name in split[info["split"]]
        assert os.path.exists(os.path.join(out, name + ".idx"))


def huge_png_header(side=20000) -> bytes:
    """A PNG that declares side x side pixels (over PIL's decompression-bomb limit) and holds
    none: enough for PIL to refuse it at open."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _bad_records(tmp_path):
    """One record per bad-record class, each between good ones, as JSONL; returns (path, kinds)."""
    good_image = write(str(tmp_path / "ok.png"), image_bytes((0, 0, 255)))
    write(str(tmp_path / "corrupt.png"), image_bytes((0, 0, 255))[:40])
    write(str(tmp_path / "huge.png"), huge_png_header())
    thin = Image.new("RGB", (2010, 10), (0, 0, 255))  # over the vision tower's 200:1
    thin.save(tmp_path / "thin.png")
    good = {"image": good_image, "conversations": [turn("human", "<image>\nx"), turn("gpt", "y")]}
    bad = [
        ("image_not_found", {"image": "missing.png", "conversations": good["conversations"]}),
        ("image_corrupt", {"image": "corrupt.png", "conversations": good["conversations"]}),
        ("image_too_large", {"image": "huge.png", "conversations": good["conversations"]}),
        ("invalid_json", None),
        ("empty_conversation", {"conversations": []}),
        ("invalid_record", {"conversations": [{"from": "human"}]}),
        ("invalid_record", {"conversations": "not a list"}),
        ("image_tag_mismatch", {"image": good_image, "conversations": [
            turn("human", "<image><image> two?"), turn("gpt", "no")]}),
        ("image_tag_mismatch", {"conversations": [turn("human", "<image>"), turn("gpt", "no image")]}),
        ("unknown_role", {"conversations": [turn("robot", "hi"), turn("gpt", "hello")]}),
        ("not_alternating", {"conversations": [turn("human", "a"), turn("human", "b"), turn("gpt", "c")]}),
        ("not_alternating", {"conversations": [turn("human", "a"), turn("gpt", "b"), turn("human", "c")]}),
        ("empty_turn", {"conversations": [turn("human", "a"), turn("gpt", "  ")]}),
        ("video_unsupported", {"video": "clip.mp4", "conversations": [
            turn("human", "<video>\nWhat happens?"), turn("gpt", "a dog runs")]}),
        ("image_too_thin", {"image": "thin.png", "conversations": good["conversations"]}),
        ("invalid_text", {"conversations": [turn("human", "a \ud800 lone surrogate"),
                                            turn("gpt", "b")]}),  # valid JSON, not Unicode
    ]
    lines = []
    for index, (_, record) in enumerate(bad):
        lines.append(json.dumps({"id": f"good{index}", **good}))
        lines.append("{broken json" if record is None else json.dumps({"id": f"bad{index}", **record}))
    path = write(str(tmp_path / "mixed.jsonl"), "\n".join(lines) + "\n")
    return path, [kind for kind, _ in bad]


def test_every_bad_record_class_is_skipped_with_line_and_reason(tmp_path):
    path, kinds = _bad_records(tmp_path)
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress", "--workers", "2"]) == EXIT_SKIPPED
    entries = skipped(out)
    assert [e["kind"] for e in entries] == kinds
    # bad records sit on the even lines 2, 4, ... of the JSONL file
    assert [e["source"] for e in entries] == [f"{path}:{2 * (i + 1)}" for i in range(len(kinds))]
    assert all(e["reason"] for e in entries)
    assert "missing.png" in entries[0]["reason"]
    converted = samples_by_id(out)
    assert set(converted) == {f"good{i}" for i in range(len(kinds))}
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    assert report["skipped"] == len(kinds) and sum(report["skipped_by_kind"].values()) == len(kinds)


def test_a_jsonl_line_that_is_not_utf8_is_skipped_and_named_not_altered(tmp_path):
    """A Latin-1 byte on one line (a BOM before the first, Windows line ends): that line is a
    bad record naming the byte and its column; the others convert with their text intact."""
    lines = [json.dumps({"id": f"r{i}", "conversations": [turn("human", "q"), turn("gpt", answer)]},
                        ensure_ascii=False).encode() for i, answer in enumerate(["café", "b", "c"])]
    lines[1] = lines[1].replace(b'"b"', b'"caf\xe9"')
    lines.append(b"{broken")
    path = write(str(tmp_path / "mixed.jsonl"), b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress"]) == EXIT_SKIPPED
    not_utf8, broken = skipped(out)
    assert not_utf8["kind"] == "invalid_json" and not_utf8["source"] == f"{path}:2"
    column = lines[1].index(b"\xe9") + 1
    assert f"line is not UTF-8 text (byte b'\\xe9' at column {column}" in not_utf8["reason"]
    assert broken["source"] == f"{path}:4"
    assert "line is not valid JSON: Expecting property name" in broken["reason"]
    assert "at column 2" in broken["reason"]
    converted = samples_by_id(out)
    assert set(converted) == {"r0", "r2"}
    assert "café" in json.dumps(converted["r0"][0], ensure_ascii=False)


def test_a_broken_json_array_keeps_the_records_before_and_names_the_line(tmp_path, capsys):
    """One syntax error in a pretty-printed array: one skip naming its line, not one per line
    (the file used to be re-read as JSON Lines), and the records before it converted."""
    records = [{"id": f"r{i}", "conversations": [turn("human", "q"), turn("gpt", f"a{i}")]}
               for i in range(4)]
    text = json.dumps(records, indent=1).replace('"id": "r2",', '"id": "r2",,', 1)
    path = write(str(tmp_path / "broken.json"), text)
    second_comma = text.index(",,") + 1
    line = text[:second_comma].count("\n") + 1
    column = second_comma - text.rindex("\n", 0, second_comma)
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress"]) == EXIT_SKIPPED
    assert "invalid_json_file: 1 .json file(s) stopped being valid JSON; the records after the " \
        "error were not read at all" in capsys.readouterr().err
    [entry] = skipped(out)
    assert entry["kind"] == "invalid_json_file" and entry["source"] == f"{path}:{line}"
    assert f"line {line} column {column}: Expecting property name" in entry["reason"]
    assert "2 record(s) were read from it, the rest of the file was not" in entry["reason"]
    converted = samples_by_id(out)
    assert set(converted) == {"r0", "r1"}
    opening_line = text[:text.index('"id": "r1"')].count("\n")  # the "{" above the id
    assert converted["r1"][0]["source"] == f"{path}#1 (line {opening_line})"


def test_json_lines_in_a_json_file_are_read_line_by_line(tmp_path):
    lines = [json.dumps({"id": f"r{i}", "conversations": [turn("human", "q"), turn("gpt", "a")]})
             for i in range(3)]
    path = write(str(tmp_path / "actually_lines.json"), "\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress"]) == 0
    converted = samples_by_id(out)
    assert {key: record["source"] for key, (record, _) in converted.items()} == \
        {f"r{i}": f"{path}:{i + 1}" for i in range(3)}


@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "folder"])
def test_a_byte_order_mark_is_not_a_bad_record(name, tmp_path):
    records = [{"id": f"r{i}", "conversations": [turn("human", "q"), turn("gpt", "a")]}
               for i in range(2)]
    bom = "\ufeff"
    if name == "data.json":
        path = write(str(tmp_path / name), bom + json.dumps(records))
    elif name == "data.jsonl":
        path = write(str(tmp_path / name), bom + "\n".join(map(json.dumps, records)) + "\n")
    else:
        path = str(tmp_path / name)
        for record in records:
            write(os.path.join(path, record["id"] + ".json"), bom + json.dumps(record))
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress"]) == 0
    assert set(samples_by_id(out)) == {"r0", "r1"}


def test_strict_makes_a_skip_an_error_and_publishes_no_index(tmp_path):
    path, _ = _bad_records(tmp_path)
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress", "--strict"]) == 1
    assert not os.path.exists(os.path.join(out, ".nv-meta"))


def test_messages_vqa_and_content_parts(tmp_path):
    png = image_bytes((9, 9, 9))
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    write(str(tmp_path / "m.png"), png)
    records = [
        {"id": "msg", "images": ["m.png"], "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]},
        {"id": "parts", "messages": [
            {"role": "user", "content": [{"type": "image", "image": data_url}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]},
        {"id": "vqa", "image_base64": data_url, "question": "Which colour?",
         "options": {"A": "red", "B": "grey"}, "answer": "B", "explanation": "It is dark."},
        {"id": "vqa_full", "image_base64": base64.b64encode(png).decode(),
         "full_question": "Pick:\nA. x\nB. y", "options": {"A": "x", "B": "y"}, "answer": "A"},
        # LLaVA-OneVision-1.5's mllm_mix.json: LLaVA turns under "messages"
        {"id": "mix", "images": ["m.png"], "messages": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
    ]
    path = write(str(tmp_path / "mixed.json"), json.dumps(records))
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress"]) == 0
    got = samples_by_id(out)
    assert got["msg"][0]["conversations"] == [turn("system", "sys"), turn("human", "<image>\nq"), turn("gpt", "a")]
    assert got["parts"][0]["conversations"] == [turn("human", "<image>\nq"), turn("gpt", "a")]
    assert got["vqa"][0]["conversations"] == [
        turn("human", "<image>\nWhich colour?\nA. red\nB. grey"),
        turn("gpt", "B. grey\n\nExplanation: It is dark.")]
    assert got["vqa_full"][0]["conversations"][1] == turn("gpt", "A. x")
    assert got["mix"][0]["conversations"] == [turn("human", "<image>\nq"), turn("gpt", "a")]
    assert all(images == {"img0.png": png} for _, images in got.values())


def test_inputs_that_do_not_fit_the_command_are_named(tmp_path, capsys):
    """A missing input is a usage error; a forced --input-format whose field a record lacks
    skips that record (it raised KeyError and left an interrupted conversion behind)."""
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"input not found: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err
    path = write(str(tmp_path / "m.jsonl"), json.dumps(
        {"id": "m", "messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a"}]}) + "\n")
    out = str(tmp_path / "out")
    assert convert_main([path, "--input-format", "llava", "--output-dir", out,
                         "--no-progress"]) == 1
    assert [(e["kind"], e["reason"]) for e in skipped(out)] == [
        ("unrecognised_record", "--input-format llava: the record has no 'conversations' field "
                                "(keys ['id', 'messages'])")]


def test_parquet_with_bytes_dicts_and_lists(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    one, two = image_bytes((1, 2, 3)), image_bytes((4, 5, 6), fmt="JPEG")
    convs = json.dumps([turn("human", "<image>\nq"), turn("gpt", "a")])
    table = pa.table({
        "id": ["p0", "p1"],
        "conversations": [convs, json.dumps([turn("human", "<image><image>q"), turn("gpt", "a")])],
        "images": [[{"bytes": one, "path": None}], [{"bytes": one, "path": None}, {"bytes": two, "path": None}]],
    })
    path = str(tmp_path / "d.parquet")
    pq.write_table(table, path)
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress"]) == 0
    got = samples_by_id(out)
    assert got["p1"][1] == {"img0.png": one, "img1.jpg": two}
    # a plain binary column named by --image-column, messages as a list column
    table = pa.table({"picture": [one], "messages": [[{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]]})
    pq.write_table(table, path)
    out2 = str(tmp_path / "out2")
    assert convert_main([path, "--output-dir", out2, "--image-column", "picture", "--no-progress"]) == 0
    (record, images), = samples_by_id(out2).values()
    assert images == {"img0.png": one} and record["conversations"][0]["value"] == "<image>\nq"


def test_folder_of_json_with_image_url_or_sibling(tmp_path):
    folder = tmp_path / "folder"
    one, two = image_bytes((7, 7, 7)), image_bytes((8, 8, 8))
    write(str(folder / "a.png"), one)
    write(str(folder / "a.json"), json.dumps({"id": "a", "question": "q", "answer": "x"}))
    write(str(folder / "pics" / "b.png"), two)
    write(str(folder / "sub" / "b.json"), json.dumps(
        {"id": "b", "image_url": "file://" + str(folder / "pics" / "b.png"),
         "conversations": [turn("human", "<image>q"), turn("gpt", "y")]}))
    out = str(tmp_path / "out")
    assert convert_main([str(folder), "--output-dir", out, "--no-progress"]) == 0
    got = samples_by_id(out)
    assert got["a"][1] == {"img0.png": one} and got["b"][1] == {"img0.png": two}


def test_output_dir_refused_unless_overwrite(llava_input, tmp_path):
    path, root, _, _ = llava_input
    out = str(tmp_path / "out")
    args = [path, "--image-root", root, "--output-dir", out, "--no-progress"]
    assert convert_main(args + ["--shard-prefix", "first"]) == 0
    write(os.path.join(out, "notes.txt"), "mine")
    write(os.path.join(out, "raw_images_backup.tar"), "mine too")  # a tar of the user's own
    assert convert_main(args) == 1
    assert convert_main(args + ["--overwrite", "--max-samples-per-shard", "1"]) == 0
    assert open(os.path.join(out, "notes.txt")).read() == "mine"
    assert open(os.path.join(out, "raw_images_backup.tar")).read() == "mine too"
    # the previous conversion's shards (named by its manifest) are gone, 5 new ones written
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == [
        "raw_images_backup.tar", *(f"subtaskdata-{i:05d}.tar" for i in range(5))]


def test_shard_size_limit_rolls_shards(tmp_path):
    big = image_bytes((1, 1, 1), (200, 200), "BMP")  # ~120 KB uncompressed
    write(str(tmp_path / "big.bmp"), big)
    records = [{"id": i, "image": "big.bmp", "conversations": [turn("human", "q"), turn("gpt", "a")]}
               for i in range(6)]
    path = write(str(tmp_path / "d.json"), json.dumps(records))
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--split", "1,0", "--max-shard-size", "250KB",
                         "--no-progress"]) == 0
    manifest = json.load(open(os.path.join(out, ".nv-meta", "llava_manifest.json")))
    assert [s["samples"] for s in manifest["shards"].values()] == [2, 2, 2]


def test_same_input_same_bytes_whatever_the_worker_count(llava_input, tmp_path):
    path, root, _, _ = llava_input
    outputs = []
    for workers in ("1", "2"):
        out = str(tmp_path / f"out{workers}")
        convert_main([path, "--image-root", root, "--output-dir", out, "--workers", workers,
                      "--split", "50,50", "--no-progress"])
        outputs.append({n: open(os.path.join(out, n), "rb").read()
                        for n in os.listdir(out) if n.endswith(".tar")})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2


def test_a_run_that_dies_publishes_nothing(llava_input, tmp_path, monkeypatch):
    path, root, _, _ = llava_input
    out = str(tmp_path / "out")

    def die(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(convert_module, "write_energon_index", die)
    with pytest.raises(RuntimeError):
        convert_main([path, "--image-root", root, "--output-dir", out, "--no-progress"])
    assert not os.path.exists(os.path.join(out, ".nv-meta"))
    monkeypatch.undo()
    monkeypatch.setattr(convert_module.SplitShardWriter, "publish", die)
    out2 = str(tmp_path / "out2")
    with pytest.raises(RuntimeError):
        convert_main([path, "--image-root", root, "--output-dir", out2, "--no-progress"])
    assert not [n for n in os.listdir(out2) if n.endswith(".tar")]


@pytest.mark.parametrize("ratio,counts", [((98, 2), (98, 2, 0)), ((90, 5, 5), (90, 5, 5)),
                                          ((1, 0), (100, 0, 0)), ((1, 1), (50, 50, 0))])
def test_split_assigner_is_exact_at_every_prefix(ratio, counts):
    assigner = SplitAssigner(ratio)
    seen = {"train": 0, "val": 0, "test": 0}
    shares = [r / sum(ratio) for r in list(ratio) + [0] * (3 - len(ratio))]
    for n in range(1, 101):
        seen[assigner.next_split()] += 1
        for split, share in zip(("train", "val", "test"), shares):
            assert abs(seen[split] - share * n) < 1.0
    assert tuple(seen.values()) == counts


def test_a_full_disk_says_to_free_space_and_rerun(tmp_path, monkeypatch, capsys):
    """The conversion itself survives it (tests/test_data_convert_resume.py); the message said
    only 'OSError: [Errno 28] No space left on device' in a traceback."""
    import errno

    from megatron_patch.data import convert_cli

    def full_disk(options):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_cli, "convert", full_disk)
    source = tmp_path / "data.json"
    source.write_text("[]")
    out = tmp_path / "out"
    assert convert_main([str(source), "--output-dir", str(out), "--no-progress"]) == 1
    assert (f"error: the disk of {out} is full ([Errno 28] No space left on device): free space "
            "(or choose another --output-dir) and rerun the same command: the conversion goes "
            "on from its last commit point") in capsys.readouterr().err


def test_a_conversion_into_a_folder_another_one_writes_is_refused(llava_input, tmp_path, capsys):
    """The second took the first's staging folder for an interrupted conversion to resume, and
    the first then died on its missing progress file."""
    import subprocess
    import sys

    from megatron_patch.data.convert import CONVERT_LOCK
    path, root, _, _ = llava_input
    out = tmp_path / "out"
    holding = ("import sys, time\nfrom megatron_patch.folder_lock import hold_folder\n"
               f"lock = hold_folder(sys.argv[1], {CONVERT_LOCK!r}, '')\n"
               "print('held', flush=True)\ntime.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", holding, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = [path, "--image-root", root, "--output-dir", str(out), "--no-progress"]
        assert convert_main(args) == 1
        assert f"error: another conversion (pid {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert convert_main(args) == 0  # the lock ended with its holder


def test_a_rerun_after_nothing_converted_is_not_refused(tmp_path, capsys):
    """A wrong --image-root skips every record and leaves only skipped.jsonl (the reasons); the
    corrected rerun was refused as 'not empty' unless --overwrite."""
    write(str(tmp_path / "pics" / "a.png"), image_bytes((0, 0, 255)))
    record = {"id": "a", "image": "a.png", "conversations": [turn("human", "<image>\nq"),
                                                            turn("gpt", "a")]}
    path = write(str(tmp_path / "d.json"), json.dumps([record]))
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress"]) == 1
    assert "no sample could be converted" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".convert.lock", "skipped.jsonl"]
    assert convert_main([path, "--image-root", str(tmp_path / "pics"), "--output-dir", out,
                         "--no-progress"]) == 0


def test_ctrl_c_says_the_same_command_goes_on(tmp_path, monkeypatch, capsys):
    from megatron_patch.data import convert_cli

    def interrupted(options):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_cli, "convert", interrupted)
    source = write(str(tmp_path / "data.json"), "[]")
    assert convert_main([source, "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 130
    assert ("interrupted: rerun the same command to go on from the last commit point (at most "
            "--commit-interval 30 s back)") in capsys.readouterr().err


def test_zero_samples_per_shard_is_refused(tmp_path, capsys):
    source = write(str(tmp_path / "data.json"), "[]")
    with pytest.raises(SystemExit):
        convert_main([source, "--output-dir", str(tmp_path / "out"), "--max-samples-per-shard",
                      "0"])
    assert "--max-samples-per-shard: must be at least 1, got 0" in capsys.readouterr().err


def test_image_data_taken_for_a_path_is_not_quoted_whole(tmp_path):
    """Base64 without a data: prefix is a path to the converter; the skip reason quoted all of
    it (megabytes on one line of skipped.jsonl)."""
    record = {"id": "b64", "image": "iVBORw0KGgo" + "A" * 5000,
              "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]}
    path = write(str(tmp_path / "d.json"), json.dumps([record]))
    out = str(tmp_path / "out")
    assert convert_main([path, "--output-dir", out, "--no-progress"]) == 1
    (entry,) = skipped(out)
    assert entry["kind"] == "image_not_found" and len(entry["reason"]) < 400
    assert "(5011 characters: image data without a data: URI prefix?)" in entry["reason"]
