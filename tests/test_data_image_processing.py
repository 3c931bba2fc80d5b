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
