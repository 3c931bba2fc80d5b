"""Normalising the record shapes found in public SFT data into one canonical conversation.

Accepted shapes (detected by their keys, or forced with `record_format`):
  llava     {"id", "image": str | [str] | absent, "conversations": [{"from", "value"}]}
  messages  {"id", "images": [...], "messages": [{"role", "content": str | [parts]}]}
  vqa       {"id", "image_base64" | "image", "question" | "full_question", "answer",
             "options": {"A": ...}?, "explanation"?}

The canonical form is LLaVA's: roles `system`/`human`/`gpt`, one `<image>` tag per image in the
human turns, in image order. Policy for records whose images carry no tag at all: the tags are
prepended to the first human turn (LLaVA's own convention) and counted in the report; any other
tag/image count mismatch is an error, because guessing where an image belongs corrupts training.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_patch.data.errors import BadRecord
from megatron_patch.data.image_bytes import ImageSource, image_source_from_value
from megatron_patch.data.shard_format import IMAGE_TAG, ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_USER

RECORD_FORMATS = ("llava", "messages", "vqa")
_ROLE_NAMES = {
    "human": ROLE_USER, "user": ROLE_USER,
    "gpt": ROLE_ASSISTANT, "assistant": ROLE_ASSISTANT,
    "system": ROLE_SYSTEM,
}
_IMAGE_KEYS = ("image", "images", "image_url", "image_base64", "image_path")
_CONSUMED_KEYS = {"id", "conversations", "messages", "question", "full_question", "answer",
                  "options", "explanation", *_IMAGE_KEYS}


@dataclass
class Conversation:
    """A record in canonical form; images are still references, loaded later in a worker."""
    id: Any
    turns: list  # [{"from": role, "value": text}]
    images: list  # [ImageSource]
    meta: dict = field(default_factory=dict)
    prepended_image_tags: bool = False


_FORMAT_KEYS = {"llava": ("conversations",), "messages": ("messages",),
                "vqa": ("question", "full_question")}


def detect_record_format(record: dict) -> str:
    if "conversations" in record:
        return "llava"
    if "messages" in record:
        return "messages"
    if "question" in record or "full_question" in record:
        return "vqa"
    raise BadRecord("unrecognised record: expected a 'conversations', 'messages' or "
                    f"'question'/'answer' field, found keys {sorted(record)[:12]}", "unrecognised_record")


def normalize_record(record: Any, record_format: Optional[str] = None,
                     fallback_id: Any = None) -> Conversation:
    if not isinstance(record, dict):
        raise BadRecord(f"record is a {type(record).__name__}, not a JSON object")
    record_format = record_format or detect_record_format(record)
    if not any(key in record for key in _FORMAT_KEYS[record_format]):  # a forced format
        raise BadRecord(f"--input-format {record_format}: the record has no "
                        f"{' or '.join(repr(k) for k in _FORMAT_KEYS[record_format])} field "
                        f"(keys {sorted(record)[:12]})", "unrecognised_record")
    builders = {"llava": _from_llava, "messages": _from_messages, "vqa": _from_vqa}
    turns, images = builders[record_format](record)
    _refuse_video(record)
    conversation = Conversation(
        id=record.get("id", fallback_id), turns=turns, images=images,
        meta={k: v for k, v in record.items() if k not in _CONSUMED_KEYS})
    _check_turns(conversation.turns)
    conversation.prepended_image_tags = _reconcile_image_tags(conversation)
    return conversation


def _refuse_video(record: dict) -> None:
    """Video samples (LLaVA-OV mixes have them) are skipped and counted: converted as text they
    would train on a literal <video> tag with the clip's frames missing. Known by their field (a
    <video> in the text alone may be HTML in a coding sample)."""
    videos = [key for key in ("video", "videos") if record.get(key)]
    if videos:
        raise BadRecord(f"video samples are not supported (images only): the record has a "
                        f"{videos[0]!r} field", "video_unsupported")


def _image_list(record: dict, keys=_IMAGE_KEYS) -> list:
    """All image references of a record, in order, from whichever key it uses."""
    for key in keys:
        value = record.get(key)
        if value is None or value == "" or value == []:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if key == "image_base64":
            return [ImageSource(base64_text=v) if isinstance(v, str) else image_source_from_value(v)
                    for v in values]
        return [image_source_from_value(v) for v in values]
    return []


def _from_llava(record: dict):
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise BadRecord("'conversations' is not a list")
    out = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRecord(f"turn {number} is not an object with 'from' and 'value'")
        out.append({"from": _role(turn["from"], number), "value": _text(turn["value"], number)})
    return out, _image_list(record)


def _from_messages(record: dict):
    messages = record["messages"]
    if not isinstance(messages, list):
        raise BadRecord("'messages' is not a list")
    turns, inline_images = [], []
    for number, message in enumerate(messages):
        if isinstance(message, dict) and "role" not in message and {"from", "value"} <= set(message):
            # LLaVA turns under 'messages': LLaVA-OneVision-1.5's own mllm_mix.json form
            message = {"role": message["from"], "content": message["value"]}
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord(f"message {number} is not an object with 'role' and 'content'")
        content = message["content"]
        if isinstance(content, list):  # OpenAI/HF style parts: [{"type": "image"}, {"type": "text"}]
            content, images = _join_content_parts(content, number)
            inline_images.extend(images)
        turns.append({"from": _role(message["role"], number), "value": _text(content, number)})
    images = _image_list(record)
    if inline_images and images:
        raise BadRecord("images given both inside message parts and in a top-level list")
    return turns, images or inline_images


def _join_content_parts(parts: list, number: int):
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            texts.append(IMAGE_TAG)
            payload = part.get("image") or part.get("image_url") or part.get("url")
            if payload is not None:
                images.append(image_source_from_value(payload))
        else:
            raise BadRecord(f"message {number} has a content part of unknown type {kind!r}")
    return "\n".join(texts), images


def _from_vqa(record: dict):
    question = record.get("full_question") or record.get("question")
    answer = record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise BadRecord("VQA record has no question text")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise BadRecord("VQA record has no answer")
    answer = str(answer).strip()
    options = record.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRecord("'options' must map letters to option texts")
    if options:
        if "full_question" not in record:  # a full_question already lists its options
            question = question + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())
        letter = answer.rstrip(".").strip()
        if letter in options:
            answer = f"{letter}. {options[letter]}"
    if record.get("explanation"):
        answer = f"{answer}\n\nExplanation: {record['explanation']}"
    turns = [{"from": ROLE_USER, "value": question}, {"from": ROLE_ASSISTANT, "value": answer}]
    return turns, _image_list(record)


def _role(name: Any, number: int) -> str:
    role = _ROLE_NAMES.get(str(name).lower()) if isinstance(name, str) else None
    if role is None:
        raise BadRecord(f"turn {number} has unknown role {name!r} "
                        f"(expected one of {sorted(_ROLE_NAMES)})", "unknown_role")
    return role


def _text(value: Any, number: int) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"turn {number} text is a {type(value).__name__}, not a string")
    return value


def _check_turns(turns: list) -> None:
    """System first (optional), then strictly human/gpt alternating, ending on an answer."""
    if not turns:
        raise BadRecord("conversation is empty", "empty_conversation")
    body = turns[1:] if turns[0]["from"] == ROLE_SYSTEM else turns
    if not body:
        raise BadRecord("conversation has only a system turn", "empty_conversation")
    for number, turn in enumerate(body):
        expected = ROLE_USER if number % 2 == 0 else ROLE_ASSISTANT
        if turn["from"] != expected:
            where = number + (len(turns) - len(body))
            raise BadRecord(f"turns do not alternate: turn {where} is {turn['from']!r}, "
                            f"expected {expected!r}", "not_alternating")
        if not turn["value"].strip():
            raise BadRecord(f"turn {number + len(turns) - len(body)} ({turn['from']}) is empty", "empty_turn")
    if body[-1]["from"] != ROLE_ASSISTANT:
        raise BadRecord("conversation ends with a human turn that has no answer", "not_alternating")


def _reconcile_image_tags(conversation: Conversation) -> bool:
    """Checks one `<image>` tag per image; prepends tags when a record has none. True if prepended."""
    tags_by_role = {}
    for turn in conversation.turns:
        tags_by_role[turn["from"]] = tags_by_role.get(turn["from"], 0) + turn["value"].count(IMAGE_TAG)
    misplaced = tags_by_role.get(ROLE_ASSISTANT, 0) + tags_by_role.get(ROLE_SYSTEM, 0)
    if misplaced:
        raise BadRecord(f"{misplaced} {IMAGE_TAG} tag(s) outside human turns", "image_tag_mismatch")
    tags, images = tags_by_role.get(ROLE_USER, 0), len(conversation.images)
    if tags == images:
        return False
    if tags == 0:
        first_user = next(t for t in conversation.turns if t["from"] == ROLE_USER)
        first_user["value"] = (IMAGE_TAG + "\n") * images + first_user["value"]
        return True
    raise BadRecord(f"{tags} {IMAGE_TAG} tag(s) but {images} image(s)", "image_tag_mismatch")
