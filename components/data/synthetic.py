"""Synthetic CT-like slices a tiny model can learn: the images of the benchmarks and the tests.

Not the phantom dataset (`phantom.py`, laid out like the Kaggle set with patients and near-duplicate
slices): one slice at a time, whose lesion's place and size tell the class.
"""

from __future__ import annotations

import io
import math

import numpy as np

SYNTHETIC_CLASSES = ("cyst", "normal", "stone", "tumor")


def draw_synthetic_scan(
    rng: np.random.Generator, label: int, n_classes: int, size: int
) -> np.ndarray:
    """A CT-like slice: a noisy body ellipse, with a bright lesion whose place and size tell the class.

    Returns uint8 `[size, size, 3]` (gray replicated to RGB, like exported CT/MRI slices).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = 0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
    body = ((xx - cx) / 0.42) ** 2 + ((yy - cy) / 0.34) ** 2 <= 1.0
    image = np.where(body, 95.0, 8.0) + rng.normal(0, 12, (size, size))
    angle = 2 * math.pi * label / n_classes + rng.normal(0, 0.15)
    lx, ly = cx + 0.22 * math.cos(angle), cy + 0.17 * math.sin(angle)
    radius = 0.05 + 0.015 * label + abs(rng.normal(0, 0.005))
    lesion = (xx - lx) ** 2 + (yy - ly) ** 2 <= radius**2
    image = np.where(lesion, 200.0 + rng.normal(0, 10, (size, size)), image)
    gray = np.clip(image, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """Encode uint8 RGB pixels as PNG or JPEG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, quality=90)
    return buffer.getvalue()
