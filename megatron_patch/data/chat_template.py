"""Qwen2-VL-style ChatML rendering of a conversation into token ids and a loss mask.

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\n<|vision_start|><|image_pad|>*N<|vision_end|>question<|im_end|>\n
    <|im_start|>assistant\nanswer<|im_end|>\n

Each piece is tokenized on its own and concatenated, so the loss mask lines up with the tokens
exactly: it is True on every assistant answer token and its `<|im_end|>` (the model must learn to
stop), False on system, user, image and role-header tokens. `<image>` tags in user turns become the
image placeholder, with one `<|image_pad|>` per image token (which the model replaces by the vision
features, in order).
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron_patch.data.shard_format import IMAGE_TAG, ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_USER
from megatron_patch.data.tokenizer import SFTTokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
_ROLE_HEADERS = {ROLE_SYSTEM: "system", ROLE_USER: "user", ROLE_ASSISTANT: "assistant"}


@dataclass
class EncodedConversation:
    input_ids: List[int]
    loss_mask: List[bool]  # True where the token is a target (an assistant token)


def encode_conversation(tokenizer: SFTTokenizer, turns: Sequence[dict],
                        image_token_counts: Sequence[int],
                        system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
                        add_generation_prompt: bool = False) -> EncodedConversation:
    """`turns` are canonical ({"from", "value"}); `image_token_counts[i]` is the number of
    `<|image_pad|>` tokens for the i-th image. With `add_generation_prompt` the rendering stops
    after the last user turn with an open assistant header (for generation)."""
    ids: List[int] = []
    mask: List[bool] = []
    newline = tokenizer.encode("\n")

    def add(piece: List[int], target: bool) -> None:
        ids.extend(piece)
        mask.extend([target] * len(piece))

    if system_prompt is not None and (not turns or turns[0]["from"] != ROLE_SYSTEM):
        turns = [{"from": ROLE_SYSTEM, "value": system_prompt}, *turns]
    images = iter(image_token_counts)
    for turn in turns:
        role = turn["from"]
        add([tokenizer.im_start_id] + tokenizer.encode(_ROLE_HEADERS[role] + "\n"), False)
        if role == ROLE_USER:
            add(_with_image_placeholders(tokenizer, turn["value"], images), False)
        else:
            add(tokenizer.encode_text(turn["value"]), role == ROLE_ASSISTANT)
        add([tokenizer.im_end_id], role == ROLE_ASSISTANT)
        add(newline, False)
    if add_generation_prompt:
        add([tokenizer.im_start_id] + tokenizer.encode("assistant\n"), False)
    leftover = sum(1 for _ in images)
    if leftover:
        raise ValueError(f"{leftover} image(s) without an {IMAGE_TAG} tag in the conversation")
    return EncodedConversation(ids, mask)


def _with_image_placeholders(tokenizer: SFTTokenizer, text: str, images) -> List[int]:
    pieces = text.split(IMAGE_TAG)
    ids = tokenizer.encode_text(pieces[0]) if pieces[0] else []
    for piece in pieces[1:]:
        count = next(images, None)
        if count is None:
            raise ValueError(f"more {IMAGE_TAG} tags than images in the conversation")
        ids += [tokenizer.vision_start_id] + [tokenizer.image_pad_id] * count + [tokenizer.vision_end_id]
        if piece:
            ids += tokenizer.encode_text(piece)
    return ids
