"""The seed contract (see README, "Seeds").

Image i of a request with seed S uses ``torch.Generator("cpu").manual_seed(S + i)``: first for its initial
latents, ``torch.randn((1, C, H/8, W/8))``, then for the scheduler's step noise. That is exactly what diffusers'
StableDiffusionPipeline does when called once per image with that generator, so both give the same picture.

Variation seeds (A1111's "Variation seed" / "Variation strength"): every image of the request keeps seed S (A1111's
rule: only the variation seed moves), and image i's initial noise is the spherical interpolation, by the
strength, from seed S's noise towards variation seed V+i's noise; step noise comes from seed S.

"Resize seed from" (A1111's ``seed_resize_from_w/h``): the seed's noise is drawn at that size and pasted, centred,
into a full-size draw of the same seed, so a seed keeps its composition when the size changes.

With ``randn_source`` NV (A1111's NV, and its GPU on NVIDIA cards) the initial noise, variation noise included,
is the numbers an NVIDIA GPU's ``torch.randn`` gives for the seed (sdtrt.contract.philox), so an A1111 seed gives A1111's
starting noise; the generators still serve the VAE's sampling and the schedulers that use them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdtrt.contract.philox import nv_randn

if TYPE_CHECKING:
    import torch

RANDOM_SEED = -1
MAX_SEED = 2**32 - 1  # AUTOMATIC1111's range; seed + i may go past it and is still a valid torch seed


def resolve_seed(seed: int) -> int:
    """-1 means "pick one"; the picked seed is returned to the caller so the image can be reproduced."""
    return secrets.randbelow(MAX_SEED + 1) if seed == RANDOM_SEED else int(seed)


def image_seeds(seed: int, count: int, varied: bool = False) -> list[int]:
    """Each image's seed: seed + i, or, while a variation seed is in use (``varied``), the seed itself for every
    image, as A1111 does (there only the variation seed moves from image to image)."""
    return [seed] * count if varied else [seed + i for i in range(count)]


def make_generators(seeds: list[int]) -> list["torch.Generator"]:
    # torch only where noise is drawn: the contract loads in a client-only install, which has none
    import torch

    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@dataclass(frozen=True)
class NoiseDraw:
    """How each image's initial noise is drawn, beyond its generator: A1111's variation seeds (``subseeds`` at
    ``subseed_strength``), its NV source (``nv``: each image's noise as an NVIDIA GPU draws it for its seed), and
    "Resize seed from" (``resize_from``, latent height and width: the seed's noise drawn at that size and pasted,
    centred, into the full-size draw of the image's generator). ``seeds``: the images' seeds."""

    seeds: list[int]
    subseeds: list[int] | None = None
    subseed_strength: float = 0.0
    nv: bool = False
    resize_from: tuple[int, int] | None = None


def initial_noise(generators: list["torch.Generator"], channels: int, latent_height: int, latent_width: int,
                  draw: NoiseDraw | None = None) -> "torch.Tensor":
    """Unscaled initial latents, one draw per image from its own generator (float32, on the CPU), drawn as
    ``draw`` says (None: the generators' plain draws)."""
    draw = draw or NoiseDraw(seeds=[])
    subseeds, subseed_strength, seeds, resize_from = draw.subseeds, draw.subseed_strength, draw.seeds, draw.resize_from
    nv_seeds = seeds if draw.nv else None
    # torch only where noise is drawn: the contract loads in a client-only install, which has none
    import torch

    full = (1, channels, latent_height, latent_width)
    shape = full if resize_from is None else (1, channels, *resize_from)

    def fresh(seed: int, size: tuple[int, ...]) -> "torch.Tensor":
        if nv_seeds is not None:
            return torch.from_numpy(nv_randn(seed, size))
        return torch.randn(size, generator=make_generators([seed])[0], dtype=torch.float32)

    if resize_from is None:
        noise = [fresh(s, shape) for s in nv_seeds] if nv_seeds is not None else [
            torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    else:
        noise = [fresh(s, shape) for s in (nv_seeds or seeds)]
    if subseeds and subseed_strength > 0:
        variations = [fresh(s, shape) for s in subseeds]
        noise = [slerp(subseed_strength, n[0], v[0])[None] for n, v in zip(noise, variations)]
    if resize_from is not None:  # the image's generator draws the full size (and moves on, as without resizing)
        canvases = [fresh(s, full) for s in nv_seeds] if nv_seeds is not None else [
            torch.randn(full, generator=g, dtype=torch.float32) for g in generators]
        noise = [paste_centred(n, canvas) for n, canvas in zip(noise, canvases)]
    return torch.cat(noise)


def paste_centred(small: "torch.Tensor", canvas: "torch.Tensor") -> "torch.Tensor":
    """``small`` [1, C, h, w] over the middle of ``canvas`` [1, C, H, W], cropped where it is larger, with
    A1111's arithmetic (an odd difference leaves the extra row or column to the canvas)."""
    (h, w), (height, width) = small.shape[-2:], canvas.shape[-2:]
    dy, dx = (height - h) // 2, (width - w) // 2
    rows = h if dy >= 0 else h + 2 * dy
    cols = w if dx >= 0 else w + 2 * dx
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out = canvas.clone()
    out[..., ty:ty + rows, tx:tx + cols] = small[..., sy:sy + rows, sx:sx + cols]
    return out


def slerp(t: float, low: "torch.Tensor", high: "torch.Tensor") -> "torch.Tensor":
    """A1111's spherical interpolation of two [C, h, w] noise tensors (angles taken along dim 1, as A1111 does)."""
    # torch only where noise is drawn: the contract loads in a client-only install, which has none
    import torch

    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:  # nearly parallel: a straight line is as good and avoids dividing by ~0
        return (1.0 - t) * low + t * high
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high
