"""Hires fix (A1111): a first pass at the requested size, an upscale, then an img2img pass at the larger size.

Upscalers, by A1111 name: the "Latent ..." ones resize the latents directly (torch interpolation, no VAE
round trip); the others decode the first pass, resize the picture with PIL, and encode it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Upscaler:
    name: str
    latent_mode: str | None = None  # torch.nn.functional.interpolate mode, for latent upscalers
    antialias: bool = False
    resample: int | None = None  # PIL resampling filter, for image upscalers


HIRES_UPSCALERS: dict[str, Upscaler] = {
    u.name: u
    for u in [
        Upscaler("Latent", "bilinear"),
        Upscaler("Latent (antialiased)", "bilinear", antialias=True),
        Upscaler("Latent (bicubic)", "bicubic"),
        Upscaler("Latent (bicubic antialiased)", "bicubic", antialias=True),
        Upscaler("Latent (nearest)", "nearest"),
        Upscaler("Latent (nearest-exact)", "nearest-exact"),
        Upscaler("None", resample=Image.Resampling.LANCZOS),  # A1111's "None": a plain resize
        Upscaler("Lanczos", resample=Image.Resampling.LANCZOS),
        Upscaler("Nearest", resample=Image.Resampling.NEAREST),
    ]
}
DEFAULT_UPSCALER = "Latent"


def target_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """A1111: the hires size is the first-pass size times the scale, rounded down to the size multiple."""
    return int(width * scale) // multiple * multiple, int(height * scale) // multiple * multiple


def upscale_latents(latents: "torch.Tensor", upscaler: Upscaler, latent_width: int, latent_height: int) -> "torch.Tensor":
    # torch only where latents are upscaled: the contract loads in a client-only install, which has none
    import torch

    kwargs = {"antialias": upscaler.antialias} if upscaler.latent_mode in ("bilinear", "bicubic") else {}
    return torch.nn.functional.interpolate(latents, size=(latent_height, latent_width), mode=upscaler.latent_mode,
                                           **kwargs)


def upscale_image(image: Image.Image, upscaler: Upscaler, width: int, height: int) -> Image.Image:
    return image.resize((width, height), resample=upscaler.resample)
