"""Tokenizer loading and the ChatML rendering with its loss mask, checked by hand."""
import pickle

import pytest

from megatron_patch.data.chat_template import encode_conversation
from megatron_patch.data.tokenizer import SFTTokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["What colour is the shape? red green blue. You are a helpful assistant."] * 20
    return SFTTokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), texts, 300))


def test_loss_mask_covers_exactly_the_answers_and_their_end_tokens(tokenizer):
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "And <image> this?"}, {"from": "gpt", "value": "green blue"}]
    encoded = encode_conversation(tokenizer, turns, image_token_counts=[4, 2])
    text = tokenizer.decode(encoded.input_ids)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>\n"
                    "What colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
                    "<|im_start|>user\nAnd <|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>"
                    " this?<|im_end|>\n<|im_start|>assistant\ngreen blue<|im_end|>\n")
    # the targets, read back span by span: each answer followed by its <|im_end|>, nothing else
    spans, current = [], []
    for token, target in zip(encoded.input_ids, encoded.loss_mask):
        if target:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans == ["red<|im_end|>", "green blue<|im_end|>"]
    assert encoded.input_ids.count(tokenizer.image_pad_id) == 6
    assert not any(m for t, m in zip(encoded.input_ids, encoded.loss_mask)
                   if t in (tokenizer.image_pad_id, tokenizer.vision_start_id, tokenizer.im_start_id))


def test_own_system_prompt_replaces_the_default_and_generation_prompt(tokenizer):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}]
    encoded = encode_conversation(tokenizer, turns, [], add_generation_prompt=True)
    assert tokenizer.decode(encoded.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert not any(encoded.loss_mask)


def test_chat_markup_typed_in_a_conversation_stays_text(tokenizer):
    """A user quoting `<|image_pad|>` broke the sample's image count (the run stopped); an
    `<|im_end|>` inside an answer became a real end of turn in the loss."""
    turns = [{"from": "human", "value": "<image>\nWhat does <|image_pad|> mean?"},
             {"from": "gpt", "value": "It ends a turn: <|im_end|> like that."}]
    encoded = encode_conversation(tokenizer, turns, image_token_counts=[3])
    assert encoded.input_ids.count(tokenizer.image_pad_id) == 3   # the image's, not the text's
    assert encoded.input_ids.count(tokenizer.im_end_id) == 3      # system, user, assistant
    assert tokenizer.decode(encoded.input_ids).endswith(
        "<|im_start|>assistant\nIt ends a turn: <|im_end|> like that.<|im_end|>\n")
    assert tokenizer.encode_text("a <|im_end|>") != tokenizer.encode("a <|im_end|>")


def test_image_count_mismatch_is_an_error(tokenizer):
    turns = [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(ValueError, match="more <image> tags"):
        encode_conversation(tokenizer, turns, [1])
    with pytest.raises(ValueError, match="without an <image> tag"):
        encode_conversation(tokenizer, turns, [1, 1, 1])


def test_tokenizer_pickles_and_loads_with_transformers(tokenizer):
    from transformers import AutoTokenizer
    text = "What colour is the shape?"
    assert pickle.loads(pickle.dumps(tokenizer)).encode(text) == tokenizer.encode(text)
    hf = AutoTokenizer.from_pretrained(tokenizer.path)
    assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf.convert_tokens_to_ids("<|image_pad|>") == tokenizer.image_pad_id


def test_missing_tokenizer_and_missing_special_tokens_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        SFTTokenizer(str(tmp_path / "nope"))
    from tokenizers import Tokenizer, models
    plain = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    (tmp_path / "plain").mkdir()
    plain.save(str(tmp_path / "plain" / "tokenizer.json"))
    with pytest.raises(ValueError, match="lacks the special tokens"):
        SFTTokenizer(str(tmp_path / "plain"))
