"""The on-disk sample layout shared by the converter, the inspector and the trainer.

One WebDataset sample per conversation. Energon splits a tar member name into key and part at
the *first* dot, so keys never contain a dot, and every image part keeps an extension that names
its real format (energon/webdataset pick the image decoder from the extension; a part without one
reaches training as raw bytes and the image silently goes missing).

    <key>.json      {"id": ..., "conversations": [{"from": "system"|"human"|"gpt", "value": ...}],
                     "images": ["img0.png", "img1.jpg"], "source": "file:line", "meta": {...}}
    <key>.img0.png  original image bytes, in the order the `<image>` tags appear in the text
    <key>.img1.jpg

Every `<image>` tag sits in a human turn, and the number of tags equals len(images).
"""
import json
import re

SHARD_PATTERN = "{prefix}-{index:05d}.tar"
DEFAULT_SHARD_PREFIX = "subtaskdata"
JSON_PART = "json"
IMAGE_TAG = "<image>"
ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = "system", "human", "gpt"
SPLITS = ("train", "val", "test")
# The converter's own manifest beside energon's files: shard sizes and sample counts, so that a
# tar changed after `prepare` (which energon does not notice) can be detected before training.
MANIFEST_NAME = "llava_manifest.json"
REPORT_NAME = "conversion_report.json"
SKIPPED_NAME = "skipped.jsonl"

_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")


def sample_key(prefix: str, index: int) -> str:
    """A unique, dot-free key for the index-th converted sample."""
    key = f"{prefix.replace('.', '_')}_{index:09d}"
    assert _KEY_OK.match(key), key
    return key


def image_part_name(position: int, extension: str) -> str:
    return f"img{position}.{extension}"


def encode_sample_json(record: dict) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_sample_json(raw: bytes) -> dict:
    return json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
