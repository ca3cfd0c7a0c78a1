"""Synthetic, harmless test images for the model-layer tests."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def skin_ellipse(size: int = 256) -> Image.Image:
    """A flat light skin-tone ellipse on a blue-grey background: harmless, yet NudeNet scores it ~0.55."""
    im = Image.new("RGB", (size, size), (90, 120, 160))
    ImageDraw.Draw(im).ellipse([size * 0.2, size * 0.15, size * 0.8, size * 0.85], fill=(255, 205, 180))
    return im


def grey(size: int = 256) -> Image.Image:
    return Image.new("RGB", (size, size), (128, 128, 128))


def noise(seed: int, size: int = 128) -> Image.Image:
    """Smooth random picture (blocky noise upscaled) so perceptual hashes have structure to work with."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)
