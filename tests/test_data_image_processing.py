"""Native-resolution preprocessing equals the Hugging Face Qwen2-VL processor bit for bit."""
import numpy as np
import pytest
from PIL import Image

from megatron_patch.data.image_processing import (ImageGeometry, fit_size, image_to_patches,
                                                  image_token_count)


@pytest.mark.parametrize("size", [(150, 97), (28, 28), (20, 500), (1000, 700)])
def test_patches_equal_transformers_qwen2vl_processor(size):
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or \
        transformers.Qwen2VLImageProcessor
    height, width = size
    image = Image.fromarray(np.random.default_rng(height).integers(0, 255, (height, width, 3), dtype=np.uint8))
    reference = processor_class(min_pixels=56 * 56, max_pixels=300 * 300, patch_size=14,
                                temporal_patch_size=2, merge_size=2)(images=[image], return_tensors="pt")
    ours, grid = image_to_patches(image, ImageGeometry(min_pixels=56 * 56, max_pixels=300 * 300,
                                                       temporal_patch_size=2))
    assert tuple(reference["image_grid_thw"][0].tolist()) == grid
    assert ours.shape == reference["pixel_values"].shape
    assert (ours - reference["pixel_values"]).abs().max().item() < 1e-6


def test_sizes_respect_the_pixel_budget_and_token_count():
    geometry = ImageGeometry(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
    for height, width in [(10, 10), (5000, 3000), (333, 777), (28, 28 * 100)]:
        h, w = fit_size(height, width, geometry)
        assert h % 28 == 0 and w % 28 == 0
        assert geometry.min_pixels <= h * w <= geometry.max_pixels
        assert image_token_count(height, width, geometry) == (h // 28) * (w // 28)
    patches, grid = image_to_patches(Image.new("RGB", (56, 84)), geometry)
    assert grid == (1, 6, 4) and patches.shape == (24, 3 * 14 * 14)  # 84x56 px: 6x4 patches, 3x2 tokens


# ------------------------------------------------------------------ the image the model sees
def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    import io
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def _quadrants() -> Image.Image:
    """96 wide, 64 high: red top-left, green top-right, blue bottom-left, white bottom-right."""
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:32, :48], pixels[:32, 48:] = (255, 0, 0), (0, 255, 0)
    pixels[32:, :48], pixels[32:, 48:] = (0, 0, 255), (255, 255, 255)
    return Image.fromarray(pixels)


def _decoded(data: bytes) -> Image.Image:
    """What the trainer decodes from the bytes a shard holds (energon_reader.decode_images)."""
    from megatron_patch.data.energon_reader import LlavaSftSample, decode_images
    sample = LlavaSftSample(__key__="k", __restore_key__=(), id="k", conversations=[],
                            images=[data], image_names=["0.jpg"])
    return decode_images(sample)[0]


def _near(image: Image.Image, y: int, x: int, colour) -> bool:
    return bool(np.abs(np.asarray(image)[y, x].astype(int) - colour).max() < 40)


@pytest.mark.parametrize("reencode", ["none", "png", "jpg"])
def test_a_phone_photo_stored_sideways_reaches_the_model_upright(reencode):
    """EXIF orientation 6 (rotate 90 degrees clockwise to display), as phones store portrait
    photos: viewers and Hugging Face's loader turn it; the model got it sideways, and
    --reencode png dropped the tag for good."""
    from megatron_patch.data.image_bytes import verified_image
    upright = _quadrants()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6
    data, _, _ = verified_image(_encoded(stored, "JPEG", exif=exif, quality=95), "photo.jpg",
                                reencode)
    seen = _decoded(data)
    assert seen.size == (96, 64)
    for (y, x), colour in (((10, 10), (255, 0, 0)), ((10, 80), (0, 255, 0)),
                           ((50, 10), (0, 0, 255)), ((50, 80), (255, 255, 255))):
        assert _near(seen, y, x, colour), (reencode, y, x, np.asarray(seen)[y, x])


def test_transparency_is_white_and_16_bit_grey_is_grey():
    """As Hugging Face's convert_to_rgb: transparent pixels on white (they were black); 16-bit
    greyscale scaled to 8 bits (PIL's conversion clipped every pixel to white)."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)          # opaque red left half, transparent right half
    seen = _decoded(_encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert _near(seen, 0, 0, (255, 0, 0)) and _near(seen, 0, 7, (255, 255, 255))
    grey = Image.fromarray(np.full((8, 8), 32768, np.uint16))  # mid grey in 16 bits
    assert grey.mode.startswith("I")
    assert _near(_decoded(_encoded(grey, "PNG")), 3, 3, (128, 128, 128))


def test_a_cmyk_jpeg_reencodes_to_png():
    """--reencode png skipped every CMYK image as corrupt ('cannot write mode CMYK as PNG')."""
    from megatron_patch.data.image_bytes import verified_image
    cmyk = _quadrants().convert("CMYK")
    data, ext, reencoded = verified_image(_encoded(cmyk, "JPEG"), "cmyk.jpg", "png")
    assert (ext, reencoded) == ("png", True)
    assert _near(_decoded(data), 10, 10, (255, 0, 0))
