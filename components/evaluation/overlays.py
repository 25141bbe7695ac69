"""Grad-CAM overlays: a scan in grey with its heat map blended over it, as the console, the gate's
review images and `tumorflow predict --explain` show them."""

from __future__ import annotations

import io
from typing import Any


def overlay_heatmap(image: bytes, heatmap: Any, alpha: float = 0.45) -> bytes:
    """The image (any format PIL reads) in grey with the heat map blended over it in a
    blue-to-red colour ramp, at the image's own size, as PNG bytes."""
    import numpy as np
    from PIL import Image

    base = Image.open(io.BytesIO(image)).convert("L").convert("RGB")
    heat = Image.fromarray(np.clip(np.asarray(heatmap) * 255, 0, 255).astype(np.uint8), "L")
    heat = np.asarray(heat.resize(base.size, Image.BILINEAR), dtype=np.float32) / 255.0
    ramp = np.stack([heat, 1.0 - np.abs(heat - 0.5) * 2, 1.0 - heat], axis=-1) * 255.0
    blend = (1 - alpha) * np.asarray(base, dtype=np.float32) + alpha * ramp
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
