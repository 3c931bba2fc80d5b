"""Native-resolution image preprocessing, Qwen2-VL style (what LLaVA-OneVision-1.5's processor does).

An image is resized so both sides are multiples of patch x merge (14 x 2 = 28) while keeping its
aspect ratio and a pixel count within [min_pixels, max_pixels]; it is then normalised and cut into
14x14 patches, ordered so that each 2x2 merge window is contiguous (the adapter merges 4
consecutive rows). One image yields (h/28)*(w/28) language-model tokens.
"""
import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from PIL import Image

from megatron_patch.data.image_view import MAX_ASPECT_RATIO, too_thin

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageGeometry:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 1
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 1280 * 28 * 28

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def fit_size(height: int, width: int, geometry: ImageGeometry) -> Tuple[int, int]:
    """Target (height, width): multiples of `factor`, aspect kept, pixels within the budget."""
    factor = geometry.factor
    if too_thin(width, height):
        raise ValueError(f"image aspect ratio {height}x{width} is over {MAX_ASPECT_RATIO}: too "
                         "thin to patch")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > geometry.max_pixels:
        scale = math.sqrt(height * width / geometry.max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
        # a very thin image keeps one row of merge windows on its short side; the budget then
        # comes off the long side (Qwen2-VL's own rule would exceed max_pixels here)
        h = min(h, max(factor, geometry.max_pixels // w // factor * factor))
        w = min(w, max(factor, geometry.max_pixels // h // factor * factor))
    elif h * w < geometry.min_pixels:
        scale = math.sqrt(geometry.min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def image_token_count(height: int, width: int, geometry: ImageGeometry) -> int:
    h, w = fit_size(height, width, geometry)
    return (h // geometry.factor) * (w // geometry.factor)


def image_to_patches(image: Image.Image, geometry: ImageGeometry) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Returns (patches [n, 3*t*p*p] float32, grid_thw (1, h/p, w/p))."""
    h, w = fit_size(image.height, image.width, geometry)
    rgb = image.convert("RGB")
    if (rgb.height, rgb.width) != (h, w):
        rgb = rgb.resize((w, h), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = (pixels - mean) / std
    p, m, t = geometry.patch_size, geometry.merge_size, geometry.temporal_patch_size
    gh, gw = h // p, w // p
    frames = pixels.unsqueeze(0).expand(t, -1, -1, -1)          # a still image repeats in time
    grid = frames.reshape(t, 3, gh // m, m, p, gw // m, m, p)
    grid = grid.permute(2, 5, 3, 6, 1, 0, 4, 7)                  # (gh/m, gw/m, m, m, C, t, p, p)
    return grid.reshape(gh * gw, 3 * t * p * p).contiguous(), (1, gh, gw)
