"""The seed contract (see README, "Seeds").

Image i of a request with seed S uses ``torch.Generator("cpu").manual_seed(S + i)``: first for its initial
latents, ``torch.randn((1, C, H/8, W/8))``, then for the scheduler's step noise. That is exactly what diffusers'
StableDiffusionPipeline does when called once per image with that generator, so both give the same picture.

Variation seeds (A1111's "Variation seed" / "Variation strength"): image i's initial noise is the spherical
interpolation, by the strength, from seed S+i's noise towards variation seed V+i's noise; step noise still
comes from seed S+i.

With ``randn_source`` NV (A1111's NV, and its GPU on NVIDIA cards) the initial noise, variation noise included,
is the numbers an NVIDIA GPU's ``torch.randn`` gives for the seed (sdtrt.philox), so an A1111 seed gives A1111's
starting noise; the generators still serve the VAE's sampling and the schedulers that use them.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RANDOM_SEED = -1
MAX_SEED = 2**32 - 1  # AUTOMATIC1111's range; seed + i may go past it and is still a valid torch seed


def resolve_seed(seed: int) -> int:
    """-1 means "pick one"; the picked seed is returned to the caller so the image can be reproduced."""
    return secrets.randbelow(MAX_SEED + 1) if seed == RANDOM_SEED else int(seed)


def image_seeds(seed: int, count: int) -> list[int]:
    return [seed + i for i in range(count)]


def make_generators(seeds: list[int]) -> list["torch.Generator"]:
    import torch

    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def initial_noise(
    generators: list["torch.Generator"],
    channels: int,
    latent_height: int,
    latent_width: int,
    subseeds: list[int] | None = None,
    subseed_strength: float = 0.0,
    nv_seeds: list[int] | None = None,
) -> "torch.Tensor":
    """Unscaled initial latents, one draw per image from its own generator (float32, on the CPU); with
    ``nv_seeds``, each image's as an NVIDIA GPU draws it for its seed (A1111's NV source)."""
    import torch

    shape = (1, channels, latent_height, latent_width)

    def nv(seeds: list[int]) -> list["torch.Tensor"]:
        from sdtrt.philox import nv_randn

        return [torch.from_numpy(nv_randn(seed, shape)) for seed in seeds]

    if nv_seeds is not None:
        noise = nv(nv_seeds)
    else:
        noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    if subseeds and subseed_strength > 0:
        variations = nv(subseeds) if nv_seeds is not None else [
            torch.randn(shape, generator=g, dtype=torch.float32) for g in make_generators(subseeds)]
        noise = [slerp(subseed_strength, n[0], v[0])[None] for n, v in zip(noise, variations)]
    return torch.cat(noise)


def slerp(t: float, low: "torch.Tensor", high: "torch.Tensor") -> "torch.Tensor":
    """A1111's spherical interpolation of two [C, h, w] noise tensors (angles taken along dim 1, as A1111 does)."""
    import torch

    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:  # nearly parallel: a straight line is as good and avoids dividing by ~0
        return (1.0 - t) * low + t * high
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high
