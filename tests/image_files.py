"""Read PNGs that tests wrote, closing the files (PIL keeps them open until collected)."""

import numpy as np
from PIL import Image


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def image_pixels(path) -> np.ndarray:
    """(H, W, C) uint8."""
    with Image.open(path) as image:
        return np.asarray(image)
