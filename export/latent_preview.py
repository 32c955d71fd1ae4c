"""Fit the model's live-preview map (:mod:`sdtrt.contract.previews`) from its own VAE at export.

Pictures with known colours (flat fields, gradients, shapes; deterministic from a seed) go through the VAE's
encoder; a least-squares fit maps each latent cell (as the U-Net sees it, times the scaling factor) to the mean
colour of the pixels it covers. For SD 1.x's VAE this lands near A1111's hand-picked "Approx cheap" numbers; for
SDXL's, or a fine-tuned VAE, it is that VAE's own.
"""

from __future__ import annotations

import numpy as np
import torch

PICTURES = 12
CELLS = 12  # latent cells per side of each picture


def scenes(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` RGB pictures in [0, 1], (count, 3, size, size): a gradient between two colours with a few
    rectangles and discs of other colours on it."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        a, b = rng.random(3), rng.random(3)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xs + np.sin(angle) * ys + 1.5) / 3.0
        picture = a[:, None, None] * (1 - t) + b[:, None, None] * t
        for _ in range(rng.integers(1, 5)):
            colour = rng.random(3)[:, None, None]
            cx, cy, r = rng.random(), rng.random(), rng.uniform(0.08, 0.35)
            if rng.random() < 0.5:
                inside = (xs - cx) ** 2 + (ys - cy) ** 2 < r * r
            else:
                inside = (abs(xs - cx) < r) & (abs(ys - cy) < r * rng.uniform(0.3, 1.0))
            picture = np.where(inside, colour, picture)
        out[i] = picture
    return out


@torch.no_grad()
def fit_latent_preview(vae, scaling_factor: float, vae_scale_factor: int, seed: int = 0) -> list[list[float]]:
    """The (latent channels + 1) x 3 map (last row: bias) from latents to colours in [0, 1]."""
    size = CELLS * vae_scale_factor
    pictures = torch.from_numpy(scenes(PICTURES, size, seed))
    latents = torch.cat([vae.encode((batch * 2 - 1).to(vae.dtype)).latent_dist.mean.float()
                         for batch in pictures.split(4)]) * scaling_factor
    colours = torch.nn.functional.avg_pool2d(pictures, vae_scale_factor)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double().numpy()
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    matrix, *_ = np.linalg.lstsq(x, y, rcond=None)
    return [[round(float(v), 6) for v in row] for row in matrix]
