"""Decoded VAE output -> uint8 pictures, with diffusers' exact rounding."""

from __future__ import annotations

import numpy as np


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """[N, 3, H, W] float in [-1, 1] -> [N, H, W, 3] uint8, as diffusers' VaeImageProcessor + numpy_to_pil."""
    images = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return (images * 255).round().astype(np.uint8)
