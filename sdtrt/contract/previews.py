"""Live previews of a generation in progress: the latents mapped straight to colours, no VAE decode.

The map is a per-model linear one (latent channels + 1 bias -> RGB), fitted at export from that model's own VAE
(:mod:`sdtrt.export.latent_preview`): A1111's "Approx cheap" preview, with coefficients that suit any VAE rather
than SD 1.x's alone. A picture at the latents' resolution (1/8 of the image's side) costs a small matrix
product, so the server can afford one a few times a second per request.
"""

from __future__ import annotations

import math

import numpy as np


def latent_preview(latents: np.ndarray, matrix: list[list[float]]) -> np.ndarray:
    """RGB uint8 (h, w, 3) of a batch of latents (B, C, h, w): each image through ``matrix`` ((C + 1) x 3, the
    last row the bias), the images laid out in a grid as A1111's progress grid does."""
    weights = np.asarray(matrix, dtype=np.float32)
    channels = weights.shape[0] - 1
    latents = np.asarray(latents, dtype=np.float32)[:, :channels]
    rgb = np.einsum("bchw,ck->bhwk", latents, weights[:channels]) + weights[channels]
    return grid(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8))


def grid(images: np.ndarray) -> np.ndarray:
    """(B, h, w, 3) images in rows of ceil(sqrt(B)), black where the last row is short."""
    count, height, width, depth = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    out = np.zeros((rows * height, cols * width, depth), dtype=images.dtype)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        out[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    return out
