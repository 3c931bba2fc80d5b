"""Reading converted shards back through energon (the trainer's path)."""
import json
import re
import tarfile

import pytest
from megatron.energon import WorkerConfig, get_loader, get_train_dataset

from megatron_patch.data.energon_reader import (LlavaSftTaskEncoder, SampleFormatError,
                                                cook_llava_sample, decode_images,
                                                iter_split_samples)
from tar_damage import overwrite_member


def test_every_sample_once_in_order_with_its_content(converted_demo, demo_data):
    records = {r["id"]: r for r in json.loads((demo_data / "demo.json").read_text())}
    manifest = json.loads((converted_demo / ".nv-meta" / "llava_manifest.json").read_text())
    seen, everything = [], []
    for split in ("train", "val"):
        samples = list(iter_split_samples(converted_demo, split))
        everything += samples
        assert len(samples) == manifest["samples"][split]
        ids = [s.id for s in samples]
        assert ids == sorted(ids)                    # input order is kept
        seen += ids
        for sample in samples:
            record = records[sample.id]
            assert sample.conversations == record["conversations"]
            assert sample.meta == {"question_types": record["question_types"]}
            image = record.get("image")
            files = [] if image is None else image if isinstance(image, list) else [image]
            assert sample.images == [(demo_data / f).read_bytes() for f in files]
            assert sample.image_names == [f"img{i}.png" for i in range(len(files))]
    assert sorted(seen) == sorted(records)           # every record exactly once
    decoded = decode_images(next(s for s in everything if len(s.images) == 2))
    assert [(i.mode, i.size) for i in decoded] == [("RGB", (56, 56))] * 2


def crude(key="k_1", **parts):
    turns = [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "a"}]
    base = {"__key__": key, "__restore_key__": ("x", 0),
            "json": json.dumps({"id": 1, "conversations": turns, "images": ["img0.png"]}).encode(),
            "img0.png": b"\x89PNG..."}
    base.update(parts)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("parts, message", [
    ({"json": None}, "no 'json' part"),
    ({"json": b"{not json"}, "not valid JSON"),
    ({"json": b"[1, 2]"}, "is a list"),
    ({"img0.png": None}, "does not hold"),
    ({"json": json.dumps({"conversations": [{"from": "human", "value": "no tag"},
                                             {"from": "gpt", "value": "a"}],
                          "images": ["img0.png"]}).encode()}, "0 <image> tag(s) but 1 image"),
    ({"json": json.dumps({"conversations": [{"from": "bot", "value": "x"}]}).encode()},
     "turn 0 is not"),
])
def test_cooker_names_the_sample_and_the_fault(parts, message):
    with pytest.raises(SampleFormatError, match=re.escape(message)) as caught:
        cook_llava_sample(crude(**parts))
    assert "sample k_1" in str(caught.value)


def test_cooked_sample_from_a_good_crude_dict():
    sample = cook_llava_sample(crude())
    assert (sample.__key__, sample.id, sample.image_names, sample.images) == \
        ("k_1", 1, ["img0.png"], [b"\x89PNG..."])
    with pytest.raises(SampleFormatError, match="image part img0.png does not decode"):
        decode_images(sample)


def test_bad_sample_raises_by_default_and_is_reported_to_a_handler(converted_copy):
    tar_path = converted_copy / "subtaskdata-00001.tar"
    with tarfile.open(tar_path) as tar:
        key = [m.name for m in tar.getmembers() if m.name.endswith(".json")][3].split(".")[0]
    overwrite_member(tar_path, f"{key}.json", lambda data: b"X" + data[1:])
    with pytest.raises(SampleFormatError, match=key):
        list(iter_split_samples(converted_copy, "val"))
    failures = []
    samples = list(iter_split_samples(converted_copy, "val",
                                      on_error=lambda e, s, src=None: failures.append((e, s))))
    assert len(samples) == 11 and key not in [s.__key__ for s in samples]
    assert len(failures) == 1 and key in str(failures[0][0])


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_task_encoder_serves_the_train_loader(converted_demo):
    worker_config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    dataset = get_train_dataset(
        str(converted_demo), worker_config=worker_config, batch_size=None,
        shuffle_buffer_size=None, max_samples_per_sequence=None, repeat=False,
        task_encoder=LlavaSftTaskEncoder())
    keys = [sample.__key__ for sample in get_loader(dataset, watchdog_timeout_seconds=None)]
    assert len(keys) == 108 and len(set(keys)) == 108
