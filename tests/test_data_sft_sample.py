"""Encoding a conversation into model inputs, truncation, packing and batching."""
import pytest
import torch
from PIL import Image

from megatron_patch.data.image_processing import ImageGeometry
from megatron_patch.data.sft_sample import (OverlongSample, collate, encode_sample, pack_samples)
from megatron_patch.data.tokenizer import SFTTokenizer, build_tiny_tokenizer

GEOMETRY = ImageGeometry(min_pixels=56 * 56, max_pixels=56 * 56)  # every image -> 4 tokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["what colour is it red green blue square circle"] * 20
    return SFTTokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), texts, 300))


def conversation(question="<image>\nwhat colour", answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_labels_are_next_tokens_and_only_answers_count(tokenizer):
    sample = encode_sample(tokenizer, conversation(), [Image.new("RGB", (56, 56), "red")],
                           GEOMETRY, seq_length=512)
    assert torch.equal(sample.labels[:-1], sample.tokens[1:])
    targets = sample.labels[sample.loss_mask.bool()].tolist()
    assert tokenizer.decode(targets) == "red<|im_end|>"
    assert int((sample.tokens == tokenizer.image_pad_id).sum()) == 4
    assert sample.pixel_values.shape == (16, 588) and sample.image_grid_thw.tolist() == [[1, 4, 4]]


def test_overlong_is_dropped_or_truncated_before_an_image(tokenizer):
    turns = conversation("long text " * 10 + "<image>\nwhat colour")
    image = Image.new("RGB", (56, 56))
    full = encode_sample(tokenizer, turns, [image], GEOMETRY, seq_length=1000)
    with pytest.raises(OverlongSample):
        encode_sample(tokenizer, turns, [image], GEOMETRY, seq_length=full.length - 1)
    start = full.tokens.tolist().index(tokenizer.vision_start_id)
    cut = encode_sample(tokenizer, turns, [image], GEOMETRY, seq_length=start + 3, overlong="truncate")
    assert cut.truncated and cut.length == start and cut.num_images == 0
    assert cut.pixel_values.shape[0] == 0


def test_packing_restarts_positions_and_marks_boundaries(tokenizer):
    a = encode_sample(tokenizer, conversation(), [Image.new("RGB", (56, 56))], GEOMETRY, 512)
    b = encode_sample(tokenizer, conversation("what", "blue"), [], GEOMETRY, 512)
    packed = pack_samples([a, b])
    assert packed.seq_lengths == [a.length, b.length]
    assert packed.position_ids.tolist() == list(range(a.length)) + list(range(b.length))
    # no loss on the token that follows the boundary (the next sample's first token)
    assert packed.loss_mask[a.length - 1] == 0
    batch = collate([packed, b], pad_id=tokenizer.pad_id, pad_to=a.length + b.length + 3, packed=True)
    row = a.length + b.length + 3
    assert batch.cu_seqlens.tolist() == [0, a.length, a.length + b.length, row,
                                         row + b.length, 2 * row]
    assert batch.tokens.shape == (2, row) and batch.loss_mask[:, -3:].sum() == 0
    assert batch.image_grid_thw.shape == (1, 3) and batch.num_samples == 3
    assert batch.max_seqlen == max(a.length, b.length, row - b.length)


def test_batches_round_up_to_a_multiple_for_sequence_parallelism(tokenizer):
    """Sequence parallelism splits every row over the TP ranks: the padded length is the next
    multiple of TP, and the added padding is out of the loss and (packed) in its own segment."""
    a = encode_sample(tokenizer, conversation(), [Image.new("RGB", (56, 56))], GEOMETRY, 512)
    b = encode_sample(tokenizer, conversation("what", "blue"), [], GEOMETRY, 512)
    longest = max(a.length, b.length)
    plain = collate([a, b], pad_id=tokenizer.pad_id)
    for multiple in (2, 4, 8):
        batch = collate([a, b], pad_id=tokenizer.pad_id, multiple_of=multiple)
        length = batch.tokens.shape[1]
        assert length % multiple == 0 and longest <= length < longest + multiple
        assert torch.equal(batch.tokens[:, :longest], plain.tokens)
        assert torch.equal(batch.loss_mask[:, :longest], plain.loss_mask)
        assert batch.loss_mask[:, longest:].sum() == 0
    packed = collate([pack_samples([a, b])], pad_id=tokenizer.pad_id, packed=True, multiple_of=8)
    length = packed.tokens.shape[1]
    assert length % 8 == 0 and packed.cu_seqlens.tolist()[-1] == length
    assert packed.cu_seqlens.tolist()[:3] == [0, a.length, a.length + b.length]


@pytest.mark.parametrize("images, text", [
    ([Image.new("RGB", (3000, 10))], "<image>\nthin?"),       # over 200:1: cannot be patched
    ([Image.new("RGB", (56, 56))], "<image><image>\ntwo?"),   # more tags than images
])
def test_a_sample_that_cannot_be_encoded_is_a_bad_sample(tokenizer, images, text):
    """A SampleFormatError, which the task encoder names and counts toward
    --max-bad-sample-fraction; a plain ValueError went to energon's handler, which dropped the
    sample with a dump of it and counted nothing."""
    from megatron_patch.data.energon_reader import SampleFormatError
    turns = [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}]
    with pytest.raises(SampleFormatError):
        encode_sample(tokenizer, turns, images, ImageGeometry(), 4096)
