"""The trainer's data path: task encoder + energon savable loaders over the converted demo."""
import json

import pytest
import torch
import yaml

from megatron_patch.data.energon_reader import decode_images, iter_split_samples
from megatron_patch.data.sft_loader import (DatasetChangedError, LoaderStateMismatch,
                                            build_train_loader, build_val_loader, check_manifest,
                                            close_loader, restore_loader_state, save_loader_state)
from megatron_patch.data.sft_sample import encode_sample
from megatron_patch.data.sft_task_encoder import (AllSamplesBad, AllSamplesOverlong,
                                                  EncoderSettings, SFTMicroBatch, SFTTaskEncoder,
                                                  find_data_stop, with_full_rows)
from megatron_patch.data.tokenizer import SFTTokenizer

PIXELS = 56 * 56  # every demo image (56x56) -> 4x4 patches -> 4 image tokens
TENSORS = ("tokens", "labels", "loss_mask", "position_ids", "pixel_values", "image_grid_thw",
           "cu_seqlens")
STATS = ("__key__", "ids", "max_seqlen", "real_tokens", "num_samples", "dropped_overlong",
         "truncated", "num_images", "capacity")


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer):
    return SFTTokenizer(demo_tokenizer)


@pytest.fixture(scope="module")
def train_lengths(converted_demo, tokenizer):
    """{key: (tokens, images)} of every train sample, encoded on its own without a limit."""
    geometry = settings(10_000).geometry
    lengths = {}
    for sample in iter_split_samples(converted_demo, "train"):
        encoded = encode_sample(tokenizer, sample.conversations, decode_images(sample), geometry,
                                10_000)
        lengths[sample.__key__] = (encoded.length, encoded.num_images)
    return lengths


def settings(seq_length, **kw):
    return EncoderSettings(seq_length=seq_length, min_pixels=PIXELS, max_pixels=PIXELS, **kw)


def take(loader, count):
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def train_loader(path, tokenizer, seq_length=512, micro_batch_size=4, dp_rank=0, dp_size=1,
                 num_workers=0, shuffle=None, **kw):
    encoder = SFTTaskEncoder(tokenizer, settings(seq_length, **kw))
    return build_train_loader(path, encoder, micro_batch_size, dp_rank, dp_size, num_workers,
                              seed=7, shuffle_buffer_size=shuffle)


def assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for one, other in zip(expected, actual):
        for name in TENSORS:
            a, b = getattr(one, name), getattr(other, name)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
        for name in STATS:
            assert getattr(one, name) == getattr(other, name), name


def test_batches_hold_masked_targets_and_matching_pixels(converted_demo, demo_data, tokenizer):
    records = {r["id"]: r for r in json.loads((demo_data / "demo.json").read_text())}
    batches = take(train_loader(converted_demo, tokenizer, shuffle=16), 6)
    for batch in batches:
        assert isinstance(batch, SFTMicroBatch) and batch.cu_seqlens is None
        rows, length = batch.tokens.shape
        assert rows == 4 == batch.num_samples == len(batch.ids) == len(batch.__key__)
        assert length == batch.max_seqlen  # padded to the longest sample, not to seq_length
        for name in ("labels", "loss_mask", "position_ids"):
            assert getattr(batch, name).shape == (rows, length)
        assert batch.capacity == rows * length
        assert batch.real_tokens == int((batch.tokens != tokenizer.pad_id).sum())
        images = 0
        for row, record_id in enumerate(batch.ids):
            record = records[record_id]
            mask = batch.loss_mask[row].bool()
            answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
            assert tokenizer.decode(batch.labels[row][mask].tolist()) == \
                "".join(answer + "<|im_end|>" for answer in answers)
            real = batch.tokens[row] != tokenizer.pad_id
            assert torch.equal(batch.labels[row][real][:-1], batch.tokens[row][real][1:])
            image = record.get("image")
            images += 0 if image is None else len(image) if isinstance(image, list) else 1
        grid = batch.image_grid_thw
        assert grid.shape == (images, 3) and batch.num_images == images
        assert batch.pixel_values.shape == (int(grid.prod(dim=1).sum()), 588)
        image_tokens = int((batch.tokens == tokenizer.image_pad_id).sum())
        assert image_tokens == int(grid.prod(dim=1).sum()) // 4   # 2x2 patches per token


@pytest.mark.parametrize("num_workers, packing", [(0, False), (0, True), (1, False)])
def test_resume_gives_the_same_batches_bit_for_bit(converted_demo, tokenizer, num_workers,
                                                   packing):
    # seq_length 80 drops some samples, so the drop counts are part of what must match
    make = dict(seq_length=256 if packing else 80, micro_batch_size=1 if packing else 3,
                num_workers=num_workers, shuffle=16, packing=packing, max_images_per_pack=3,
                packing_buffer_size=16)
    first = train_loader(converted_demo, tokenizer, **make)
    batches = iter(first)
    for _ in range(5):
        next(batches)
    state = save_loader_state(first)
    expected = [next(batches) for _ in range(6)]
    assert sum(b.dropped_overlong for b in expected) > 0 or packing
    state = torch.load(_saved(state), weights_only=False)  # as the checkpoint stores it
    resumed = train_loader(converted_demo, tokenizer, **make)
    restore_loader_state(resumed, state, num_workers)
    assert_same_batches(expected, take(resumed, 6))
    for loader in (first, resumed):
        close_loader(loader)   # stops the workers now, not after torch's 5 s join timeout


def _saved(state):
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_restoring_with_other_num_workers_says_so(converted_demo, tokenizer):
    loader = train_loader(converted_demo, tokenizer)
    take(loader, 2)
    state = save_loader_state(loader)
    other = train_loader(converted_demo, tokenizer, num_workers=1)
    with pytest.raises(LoaderStateMismatch, match="saved with --num-workers 0, but this run uses "
                                                  "--num-workers 1"):
        restore_loader_state(other, state, 1)
    with pytest.raises(LoaderStateMismatch, match="data-parallel size 1"):
        restore_loader_state(train_loader(converted_demo, tokenizer, dp_size=2), state, 0)


def test_data_parallel_ranks_see_disjoint_samples(converted_demo, tokenizer, train_lengths):
    seen = []
    for rank in (0, 1):
        # no shuffle buffer: with one, the next epoch's first samples mix into this one's end
        batches = take(train_loader(converted_demo, tokenizer, dp_rank=rank, dp_size=2), 13)
        keys = [key for batch in batches for key in batch.__key__]
        assert len(keys) == len(set(keys)) == 52   # 54 per rank: no repeat yet
        seen.append(set(keys))
    assert not seen[0] & seen[1] and seen[0] | seen[1] <= set(train_lengths)


def test_packed_batches(converted_demo, tokenizer, train_lengths):
    capacity, cap = 256, 3
    batches = take(train_loader(converted_demo, tokenizer, seq_length=capacity,
                                micro_batch_size=1, packing=True, max_images_per_pack=cap,
                                packing_buffer_size=32), 12)
    for batch in batches:
        assert batch.tokens.shape == (1, capacity) and batch.capacity == capacity
        lengths = [train_lengths[key][0] for key in batch.__key__]
        segments = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
        padding = capacity - sum(lengths)
        assert segments == lengths + ([padding] if padding else [])
        assert batch.cu_seqlens.dtype == torch.int32 and batch.max_seqlen == max(segments)
        for start, size in zip(batch.cu_seqlens[:-1].tolist(), segments):
            assert batch.position_ids[0, start:start + size].tolist() == list(range(size))
        assert batch.loss_mask[0, sum(lengths):].sum() == 0
        assert batch.num_samples == len(lengths)
        assert batch.num_images == sum(train_lengths[k][1] for k in batch.__key__) <= cap
        assert batch.packing_efficiency == sum(lengths) / capacity
    assert max(b.num_images for b in batches) == cap        # the image cap binds here ...
    efficiency = sum(b.real_tokens for b in batches) / sum(b.capacity for b in batches)
    assert efficiency > 0.6, efficiency                     # ... and still ~3 samples per pack
    assert sum(b.num_samples for b in batches) / len(batches) > 2


def test_sample_cap_limits_the_segments_of_a_pack(converted_demo, tokenizer):
    """--max-samples-per-pack reaches the task encoder's packer: at most that many samples,
    so at most one more segment (the trailing padding), where ~3 would share a pack."""
    batches = take(train_loader(converted_demo, tokenizer, seq_length=256, micro_batch_size=1,
                                packing=True, max_samples_per_pack=2, packing_buffer_size=32), 12)
    assert max(batch.num_samples for batch in batches) == 2
    assert max(batch.cu_seqlens.numel() - 1 for batch in batches) <= 3


def test_overlong_samples_are_dropped_and_counted(converted_demo, tokenizer, train_lengths):
    limit = 60
    fits = {key for key, (length, _) in train_lengths.items() if length <= limit}
    overlong = len(train_lengths) - len(fits)
    assert fits and overlong
    batches = take(train_loader(converted_demo, tokenizer, seq_length=limit, micro_batch_size=1),
                   len(fits) + 1)
    epoch = batches[:len(fits)]
    assert {b.__key__[0] for b in epoch} == fits       # each fitting sample once, no other
    assert all(b.tokens.shape[1] <= limit for b in batches)
    # drops are reported by the next batch: all of this epoch's by the first of the next one
    assert 0 < sum(b.dropped_overlong for b in epoch) <= overlong
    assert sum(b.dropped_overlong for b in batches) >= overlong


def test_truncate_keeps_overlong_samples(converted_demo, tokenizer, train_lengths):
    limit = 60
    batches = take(train_loader(converted_demo, tokenizer, seq_length=limit, overlong="truncate"),
                   len(train_lengths) // 4)
    keys = [key for b in batches for key in b.__key__]
    assert sorted(keys) == sorted(train_lengths)
    assert sum(b.truncated for b in batches) == \
        sum(1 for length, _ in train_lengths.values() if length > limit)
    assert sum(b.dropped_overlong for b in batches) == 0
    assert all(b.tokens.shape[1] <= limit for b in batches)


def test_all_samples_too_long_stops_with_a_clear_error(converted_demo, tokenizer):
    """The loader's error carries ours; the trainer finds it (find_data_stop) to report it alone,
    not energon's wrapping with a sample's whole repr."""
    loader = train_loader(converted_demo, tokenizer, seq_length=20, max_consecutive_drops=30)
    with pytest.raises(Exception, match="30 samples in a row are longer than --seq-length 20") \
            as caught:
        take(loader, 1)
    stop = find_data_stop(caught.value)
    assert isinstance(stop, AllSamplesOverlong)
    assert str(stop).startswith("30 samples in a row are longer than --seq-length 20")


def test_a_stop_from_a_loader_worker_is_found_in_its_traceback_text():
    """torch re-raises a worker's error with the worker's traceback as text only."""
    text = ("Caught FatalSampleError in DataLoader worker process 0.\nOriginal Traceback (most "
            "recent call last):\n  File ...\nmegatron_patch.data.sft_task_encoder.AllSamplesBad: "
            "50 samples in a row did not decode (last: k: broken)\n\nThe above exception ...")
    stop = find_data_stop(RuntimeError(text))
    assert isinstance(stop, AllSamplesBad)
    assert str(stop) == "50 samples in a row did not decode (last: k: broken)"
    assert find_data_stop(RuntimeError("a shard is truncated")) is None


def test_val_loader_is_one_pass_and_absent_without_val(converted_demo, converted_copy, tokenizer):
    encoder = SFTTaskEncoder(tokenizer, settings(512))
    loader = build_val_loader(converted_demo, encoder, 5)
    keys = [key for batch in loader for key in batch.__key__]
    assert len(keys) == len(set(keys)) == 12
    assert [key for batch in loader for key in batch.__key__] == keys   # a new pass, same order
    split_yaml = converted_copy / ".nv-meta" / "split.yaml"
    layout = yaml.safe_load(split_yaml.read_text())
    layout["split_parts"]["val"] = []
    split_yaml.write_text(yaml.safe_dump(layout))
    assert build_val_loader(converted_copy, encoder, 5) is None


@pytest.mark.parametrize("packing", [False, True])
def test_a_short_last_val_batch_is_filled_with_loss_masked_rows(converted_demo, tokenizer, packing):
    """Pipeline stages exchange [seq, micro_batch_size, hidden] activations: the evaluation
    fills the split's last micro-batch to full size instead of dropping its samples."""
    length, rows = 256, 8
    encoder = SFTTaskEncoder(tokenizer, settings(length, packing=packing, pad_to_seq_length=True))
    batches = list(build_val_loader(converted_demo, encoder, rows))
    short = batches[-1]
    kept = short.tokens.shape[0]
    assert kept < rows
    full = with_full_rows(short, rows)
    for name in ("tokens", "labels", "loss_mask", "position_ids"):
        tensor = getattr(full, name)
        assert tensor.shape == (rows, length) and tensor.dtype == getattr(short, name).dtype
        assert torch.equal(tensor[:kept], getattr(short, name)), name
    assert full.loss_mask[kept:].sum() == 0
    assert torch.equal(full.position_ids[kept:], torch.arange(length).expand(rows - kept, length))
    if packing:  # each padding row is a segment of its own: no real token attends to it
        assert torch.equal(full.cu_seqlens[:len(short.cu_seqlens)], short.cu_seqlens)
        assert full.cu_seqlens[len(short.cu_seqlens) - 1:].diff().tolist() == [length] * (rows - kept)
        assert full.cu_seqlens.dtype == torch.int32 and full.max_seqlen == length
    else:
        assert full.cu_seqlens is None
    for name in ("pixel_values", "image_grid_thw"):
        assert torch.equal(getattr(full, name), getattr(short, name))
    assert (full.__key__, full.real_tokens, full.num_samples) == (
        short.__key__, short.real_tokens, short.num_samples)
    assert full.capacity == rows * length
    assert with_full_rows(full, rows) is full  # a full micro-batch is passed on as it is


def test_manifest_check_finds_a_changed_shard(converted_demo, converted_copy, tmp_path):
    assert check_manifest(converted_demo) == [str(converted_demo)]
    metadataset = tmp_path / "blend.yaml"
    metadataset.write_text(yaml.safe_dump({
        "__module__": "megatron.energon", "__class__": "MetadatasetV2",
        "splits": {"train": {"blend": [{"weight": 1, "path": "ds"}]}}}))
    assert check_manifest(metadataset) == [str(converted_copy)]
    with open(converted_copy / "subtaskdata-00000.tar", "ab") as handle:
        handle.write(b"\0" * 512)
    for path in (converted_copy, metadataset):
        with pytest.raises(DatasetChangedError, match=r"(?s)changed after conversion.*"
                                                      r"subtaskdata-00000\.tar: size \d+ bytes.*"
                                                      r"re-run the conversion"):
            check_manifest(path)
    (converted_copy / ".nv-meta" / "llava_manifest.json").unlink()
    assert check_manifest(converted_copy) == []        # no manifest: nothing to compare with
