"""The RGB image the model sees, from the image as stored; shared by the trainer's decoding,
the inspector's thumbnails and the converter's re-encoding (PIL and numpy only: the converter's
workers do not import torch)."""
import numpy as np
from PIL import Image, ImageOps

WHITE = (255, 255, 255, 255)
MAX_ASPECT_RATIO = 200  # longest / shortest side the vision tower can patch (Qwen2-VL's limit)


def too_thin(width: int, height: int) -> bool:
    """Longer side over MAX_ASPECT_RATIO times the shorter: the vision tower cannot patch it
    (the converter skips it, the inspector names it, the trainer counts it as a bad sample)."""
    return max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height))


def model_view(image: Image.Image) -> Image.Image:
    """The RGB image the model sees, as Hugging Face's loaders make it: the EXIF orientation
    applied (a phone photo taken upright, stored sideways), transparency on white, and 16-bit
    greyscale scaled to 8 bits (PIL's own conversion clips it to white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I" (32-bit, holding the 16-bit values)
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        if image.mode != "I" or values.max() > 255:
            values = values >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return image.convert("RGB")
