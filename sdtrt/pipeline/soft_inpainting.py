"""A1111's Soft Inpainting (its built-in extension extensions-builtin/soft-inpainting), on sdtrt's loops.

Two changes to an inpainting request on an ordinary U-Net, both driven by the latent mask (unrounded):

1. Every time the sampler's denoiser blends the picture's latents into its estimate, the mask is raised to the
   power ``sigma ** schedule_bias * preservation_strength`` (the noisier the step, the less of the original),
   and the two are interpolated with their vectors' lengths interpolated apart, to the power
   ``transition_contrast_boost`` (``blend``). The blend after the last step is left out.
2. Once sampled, how far each latent cell moved from the picture's says where the original shows through: the
   distances pass a weighted-histogram filter twice (the top tenth, then the middle half of a 5 x 5 Gaussian
   window), are divided by a threshold the mask biases, shaped by a contrast power and smootherstep, resized to
   the picture and blurred: the overlay mask each image is pasted through (``overlay_masks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    from sdtrt.requests.request import Img2ImgRequest

KERNEL_STDDEV, KERNEL_RADIUS = 1.5, 2  # the filters' Gaussian window, A1111's


@dataclass(frozen=True)
class SoftInpainting:
    """The request's soft inpainting settings (sdtrt.requests.fields: soft_inpainting_*)."""

    schedule_bias: float
    preservation_strength: float
    transition_contrast_boost: float
    mask_influence: float
    difference_threshold: float
    difference_contrast: float

    @classmethod
    def of(cls, request: "Img2ImgRequest") -> "SoftInpainting | None":
        """The settings when the request turns soft inpainting on, else None."""
        if not getattr(request, "soft_inpainting", False):
            return None
        return cls(*(float(getattr(request, f"soft_inpainting_{name}")) for name in cls.__dataclass_fields__))

    def blend(self, picture: torch.Tensor, current: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
        """The denoiser's estimate ``current`` with the ``picture``'s latents blended in where ``mask`` (1: redraw)
        says, at noise level ``sigma`` (A1111's timestep samplers: the timestep)."""
        t = torch.pow(mask, torch.tensor(sigma, dtype=torch.float32) ** self.schedule_bias
                      * self.preservation_strength)
        mixed = picture * (1 - t) + current * t
        # the lengths in float64: the power can be large
        length = torch.linalg.vector_norm(mixed, dim=1, keepdim=True).double() + 0.00001
        power = self.transition_contrast_boost
        t1 = t[:, :1]
        wanted = (torch.linalg.vector_norm(picture, dim=1, keepdim=True).double() ** power * (1 - t1)
                  + torch.linalg.vector_norm(current, dim=1, keepdim=True).double() ** power * t1) ** (1 / power)
        return mixed * (wanted / length).to(mixed.dtype)

    def overlay_masks(self, mask: torch.Tensor, picture: torch.Tensor, samples: torch.Tensor,
                      size: tuple[int, int]) -> list[Image.Image]:
        """Each image's overlay mask (white: show the redrawn picture) at ``size`` (w, h), from how far its final
        latents ``samples`` moved from the ``picture``'s, where the latent ``mask`` (its first row) allows."""
        cells = torch.clamp(mask[0, 0].float(), 0, 1)
        scalar = 1 - cells ** (self.preservation_strength / 2)
        scalar = 0.5 * (1 - self.mask_influence) + scalar * self.mask_influence
        scalar = (scalar / (1.00001 - scalar)).cpu().numpy()
        distances = torch.linalg.vector_norm(samples.float() - picture.float(), dim=1).cpu().numpy()
        kernel = gaussian_kernel(KERNEL_STDDEV, KERNEL_RADIUS)
        masks = []
        for distance in distances:
            filtered = histogram_filter(distance, kernel, 0.9, 1.0)
            filtered = histogram_filter(filtered, kernel, 0.25, 0.75)
            shown = 1 / (1 + (filtered / (self.difference_threshold * scalar)) ** self.difference_contrast)
            shown = 1 - smootherstep(shown)
            picture_mask = Image.fromarray((255.0 * shown).astype(np.uint8)).resize(size, Image.LANCZOS)
            masks.append(picture_mask.filter(ImageFilter.GaussianBlur(radius=4)))
        return masks


def smootherstep(x: np.ndarray) -> np.ndarray:
    return x * x * x * (x * (6 * x - 15) + 10)


def gaussian_kernel(stddev: float, radius: int) -> np.ndarray:
    """A (2r + 1)^2 Gaussian window, 1 at its centre, lowered and rescaled to reach 0 one cell past ``radius``."""
    zero = np.exp(-((radius + 1.0) ** 2) / stddev ** 2)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return np.maximum(0.0, (np.exp(-squared / stddev ** 2) - zero) / (1 - zero))


def histogram_filter(image: np.ndarray, kernel: np.ndarray, low: float, high: float,
                     min_width: float = 1.0) -> np.ndarray:
    """Each pixel: the weighted mean of the values in its window between the ``low`` and ``high`` fractions of
    their weighted histogram (the window's values sorted, each as wide as its kernel weight; at least
    ``min_width`` of it). The window is cut at the image's edges. All windows at once."""
    height, width = image.shape
    radius = kernel.shape[0] // 2
    values = np.pad(image.astype(np.float64), radius)
    inside = np.pad(np.ones_like(image, dtype=np.float64), radius)
    shifts = [(dy, dx) for dy in range(kernel.shape[0]) for dx in range(kernel.shape[1])]
    stack = np.stack([values[dy:dy + height, dx:dx + width] for dy, dx in shifts])
    weights = np.stack([kernel[dy, dx] * inside[dy:dy + height, dx:dx + width] for dy, dx in shifts])
    order = np.argsort(stack, axis=0, kind="stable")
    stack, weights = np.take_along_axis(stack, order, 0), np.take_along_axis(weights, order, 0)
    tops = np.cumsum(weights, axis=0)
    bottoms, total = tops - weights, tops[-1]
    start, end = total * low, total * high
    narrow = end - start < min_width
    centre = (start + end) / 2
    start, end = np.where(narrow, centre - min_width / 2, start), np.where(narrow, centre + min_width / 2, end)
    over = narrow & (end > total)
    start, end = np.where(over, total - min_width, start), np.where(over, total, end)
    under = narrow & (start < 0)
    start, end = np.where(under, 0.0, start), np.where(under, min_width, end)
    overlap = np.clip(np.minimum(end, tops) - np.maximum(start, bottoms), 0, None)
    weight = overlap.sum(axis=0)
    mean = np.divide((stack * overlap).sum(axis=0), weight, out=np.zeros_like(weight), where=weight != 0)
    return mean.astype(image.dtype)
