"""Hires fix (A1111): a first pass at the requested size, an upscale, then an img2img pass at the larger size.

Upscalers, by A1111 name: the "Latent ..." ones resize the latents directly (torch interpolation, no VAE
round trip); the others decode the first pass, resize the picture with PIL, and encode it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from PIL import Image

from sdtrt.contract.errors import InvalidRequest

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
# An upscaler model's tiles (A1111's options ESRGAN_tile, ESRGAN_tile_overlap; DAT_tile and SWIN_tile and their
# overlaps for DAT and SwinIR, the same defaults): the networks take tiles up to MAX_TILE a side (A1111's sliders end there); 0, the
# whole picture, runs tiles of that size on larger ones
MAX_TILE, DEFAULT_TILE, DEFAULT_OVERLAP, MAX_OVERLAP = 512, 192, 8, 48


@dataclass(frozen=True)
class Tiling:
    """A1111's tiling options for upscaler models, one pair per way of tiling: ``grid`` (ESRGAN_tile: the
    ESRGAN family, cut and faded by its split_grid), ``dat`` (DAT_tile: DAT, the same way) and ``swin`` (SWIN_tile:
    SwinIR, tiles averaged where they overlap). A pair is (tile side, overlap), each named by its request field for
    errors."""

    grid: tuple[int, int] = (DEFAULT_TILE, DEFAULT_OVERLAP)
    swin: tuple[int, int] = (DEFAULT_TILE, DEFAULT_OVERLAP)
    dat: tuple[int, int] = (DEFAULT_TILE, DEFAULT_OVERLAP)
    fields = {"grid": ("upscaler_tile", "upscaler_tile_overlap"), "swin": ("swinir_tile", "swinir_tile_overlap"),
              "dat": ("dat_tile", "dat_tile_overlap")}

    @classmethod
    def from_fields(cls, value: Callable[[str], int]) -> "Tiling":
        """The options from each field's value (``value(field name)``: a request's, or the A1111 option's)."""
        return cls(**{kind: (value(tile), value(overlap)) for kind, (tile, overlap) in cls.fields.items()})

    def of(self, kind: str) -> tuple[int, int]:
        """(tile, overlap) for a model tiled by ``kind``; an overlap as large as its tile is refused by name (A1111
        divides by zero there)."""
        tile, overlap = getattr(self, kind)
        if tile > 0 and overlap >= min(tile, MAX_TILE):
            tile_field, overlap_field = self.fields[kind]
            raise InvalidRequest(overlap_field, overlap, f"below {tile_field} ({tile}), from 0 to {MAX_OVERLAP}")
        return tile, overlap


def target_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """A1111: the hires size is the first-pass size times the scale, rounded down to the size multiple."""
    return int(width * scale) // multiple * multiple, int(height * scale) // multiple * multiple


@dataclass(frozen=True)
class HiresSize:
    """A1111's hires sizes, in pixels: what the first pass is upscaled to, and the second pass's size, the upscale
    cropped evenly on both sides where "Resize width/height to" asks for another aspect ratio."""

    upscale: tuple[int, int]  # (width, height)
    final: tuple[int, int]

    def crop(self, latents: "torch.Tensor", multiple: int) -> "torch.Tensor":
        """The upscaled latents cut to the final size: A1111 drops half the extra rows (and columns) at each
        side, the odd one at the end."""
        cut_x, cut_y = ((u - f) // multiple for u, f in zip(self.upscale, self.final))
        height, width = latents.shape[-2:]
        return latents[..., cut_y // 2:height - (cut_y + 1) // 2, cut_x // 2:width - (cut_x + 1) // 2]


def hires_size(width: int, height: int, scale: float, resize_x: int, resize_y: int, multiple: int) -> HiresSize:
    """A1111's hires target: the first pass times ``scale``, or "Resize width/height to" (``resize_x``/``resize_y``,
    0: follow the other side's ratio); with both, the first pass's aspect ratio is kept to cover them and the rest
    cropped. Sizes are rounded down to the size multiple, as the latents are."""
    if not resize_x and not resize_y:
        size = target_size(width, height, scale, multiple)
        return HiresSize(size, size)
    if not resize_y:
        to, target = (resize_x, resize_x * height // width), None
    elif not resize_x:
        to, target = (resize_y * width // height, resize_y), None
    else:
        cover_width = width / height < resize_x / resize_y
        to = (resize_x, resize_x * height // width) if cover_width else (resize_y * width // height, resize_y)
        target = (resize_x, resize_y)
    upscale = (to[0] // multiple * multiple, to[1] // multiple * multiple)
    if target is None:
        return HiresSize(upscale, upscale)
    cut = [(t - want) // multiple * multiple for t, want in zip(to, target)]  # A1111's truncate, in pixels
    return HiresSize(upscale, (upscale[0] - cut[0], upscale[1] - cut[1]))


def upscale_latents(latents: "torch.Tensor", upscaler: Upscaler, latent_width: int, latent_height: int) -> "torch.Tensor":
    # torch only where latents are upscaled: the contract loads in a client-only install, which has none
    import torch

    kwargs = {"antialias": upscaler.antialias} if upscaler.latent_mode in ("bilinear", "bicubic") else {}
    return torch.nn.functional.interpolate(latents, size=(latent_height, latent_width), mode=upscaler.latent_mode,
                                           **kwargs)


def upscale_image(image: Image.Image, upscaler: Upscaler, width: int, height: int) -> Image.Image:
    return image.resize((width, height), resample=upscaler.resample)
