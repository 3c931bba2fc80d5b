"""Turning an image reference from a record into verified bytes plus a truthful file extension.

The converter stores original bytes (no re-encoding, so no quality loss and no wasted CPU), but
names each tar part after the format detected from the bytes themselves: energon's decoder picks
the handler by extension, and a `.jpg` that is really a PNG, or a part with no extension, is how
images go silently missing at training time.
"""
import base64
import binascii
import io
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_patch.data.errors import BadRecord
from megatron_patch.data.image_view import MAX_ASPECT_RATIO, model_view, too_thin

# Magic numbers of the formats energon/webdataset decode by extension.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_PIL_FORMAT_TO_EXT = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
                      "WEBP": "webp"}
REENCODE_CHOICES = ("none", "png", "jpg")


def detect_extension(data: bytes) -> Optional[str]:
    """The image format named by the leading bytes, or None when it is not one we store as is."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, ext in _SIGNATURES:
        if data.startswith(magic):
            return ext
    return None


@dataclass(frozen=True)
class ImageSource:
    """Where a record's image comes from: a path, inline bytes, or a (data: URL or bare) base64 string."""
    path: Optional[str] = None
    data: Optional[bytes] = None
    base64_text: Optional[str] = None

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        return "<inline bytes>" if self.data is not None else "<base64 string>"


def image_source_from_value(value) -> ImageSource:
    """Interprets the many shapes an image takes in public SFT data (str, bytes, {"bytes": ...})."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageSource(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return ImageSource(data=bytes(value["bytes"]))
        if value.get("path"):
            return ImageSource(path=str(value["path"]))
        if value.get("url") or value.get("image_url"):
            return image_source_from_value(value.get("url") or value.get("image_url"))
        raise BadRecord(f"image entry has neither 'bytes' nor 'path': keys {sorted(value)}", "image_invalid")
    if isinstance(value, str):
        if value.startswith("data:"):
            return ImageSource(base64_text=value)
        if value.startswith(("http://", "https://")):
            raise BadRecord(f"remote image URL is not fetched: {value[:120]} "
                            "(download the images and give local paths)", "image_remote")
        if value.startswith("file://"):
            value = value[len("file://"):]
        return ImageSource(path=value)
    raise BadRecord(f"image entry of type {type(value).__name__} is not a path, bytes or dict", "image_invalid")


def decode_base64_image(text: str) -> bytes:
    """Decodes `data:image/...;base64,XXXX` or a bare base64 string."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise BadRecord(f"data URL is not base64-encoded: {header[:60]}", "image_invalid")
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as error:
        raise BadRecord(f"invalid base64 image: {error}", "image_invalid") from None


def resolve_image_path(path: str, search_dirs: Sequence[str]) -> str:
    if os.path.isabs(path):
        if os.path.isfile(path):
            return path
        raise BadRecord(f"image not found: {_shown(path)}", "image_not_found")
    for directory in search_dirs:
        candidate = os.path.join(directory, path)
        if os.path.isfile(candidate):
            return candidate
    raise BadRecord(f"image not found: {_shown(path)} (looked under {', '.join(search_dirs)}; "
                    "set --image-root to the folder the paths are relative to)", "image_not_found")


def _shown(path: str) -> str:
    """A path as messages show it: a very long one (image data without a data: URI prefix,
    taken for a path) cut short, not megabytes on one line of skipped.jsonl."""
    if len(path) <= 200:
        return path
    return f"{path[:60]}... ({len(path)} characters: image data without a data: URI prefix?)"


def load_image_bytes(source: ImageSource, search_dirs: Sequence[str]) -> bytes:
    if source.data is not None:
        return source.data
    if source.base64_text is not None:
        return decode_base64_image(source.base64_text)
    resolved = resolve_image_path(source.path, search_dirs)
    try:
        with open(resolved, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise BadRecord(f"image unreadable: {resolved}: {error.strerror}", "image_unreadable") from None


def _reencode(image: Image.Image, ext: str) -> bytes:
    """The re-encoded file drops the EXIF orientation tag, so the pixels are turned upright
    first; JPEG holds no transparency (put on white, as the model sees it), and PNG no CMYK."""
    out = io.BytesIO()
    if ext == "jpg":
        model_view(image).save(out, format="JPEG", quality=95)
    else:
        upright = ImageOps.exif_transpose(image)
        if upright.mode not in _PNG_MODES:
            upright = upright.convert("RGBA" if "A" in upright.mode else "RGB")
        upright.save(out, format="PNG")
    return out.getvalue()


_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


def verified_image(data: bytes, what: str, reencode: str = "none") -> tuple[bytes, str, bool]:
    """Fully decodes the image (a truncated file must fail here, not at training time).

    Returns (bytes, extension, reencoded). Bytes are kept as they are unless `reencode` asks for a
    format, or the format is one energon would not decode by extension (then PNG, counted).
    """
    if not data:
        raise BadRecord(f"image is empty: {what}", "image_corrupt")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                raise BadRecord(f"image has no pixels: {what}", "image_corrupt")
            if too_thin(image.width, image.height):
                raise BadRecord(f"image too thin for the vision tower: {what} is "
                                f"{image.width}x{image.height}, over {MAX_ASPECT_RATIO}:1",
                                "image_too_thin")
            ext = detect_extension(data) or _PIL_FORMAT_TO_EXT.get(image.format or "")
            target = reencode if reencode != "none" else (None if ext else "png")
            if target is None or target == ext:
                return data, ext, False
            return _reencode(image, target), target, True
    except BadRecord:
        raise
    except Image.DecompressionBombError as error:  # a pixel count PIL will not decode
        raise BadRecord(f"image too large to decode: {what}: {error}; downscale it (the trainer "
                        "resizes every image to at most --max-pixels anyway)",
                        "image_too_large") from None
    except UnidentifiedImageError:
        raise BadRecord(f"image cannot be decoded: {what}: not a recognised image format "
                        f"(starts with {data[:8]!r})", "image_corrupt") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadRecord(f"image cannot be decoded: {what}: {error}", "image_corrupt") from None
