"""The seed contract (see README, "Seeds").

Image i of a request with seed S uses ``torch.Generator("cpu").manual_seed(S + i)``: first for its initial
latents, ``torch.randn((1, C, H/8, W/8))``, then for the scheduler's step noise. That is exactly what diffusers'
StableDiffusionPipeline does when called once per image with that generator, so both give the same picture.

Variation seeds (A1111's "Variation seed" / "Variation strength"): image i's initial noise is the spherical
interpolation, by the strength, from seed S+i's noise towards variation seed V+i's noise; step noise still
comes from seed S+i.
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
) -> "torch.Tensor":
    """Unscaled initial latents, one draw per image from its own generator (float32, on the CPU)."""
    import torch

    shape = (1, channels, latent_height, latent_width)
    noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    if subseeds and subseed_strength > 0:
        variations = [torch.randn(shape, generator=g, dtype=torch.float32) for g in make_generators(subseeds)]
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
