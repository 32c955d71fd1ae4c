"""The seed contract (see README, "Seeds").

Image i of a request with seed S uses ``torch.Generator("cpu").manual_seed(S + i)``: first for its initial
latents, ``torch.randn((1, C, H/8, W/8))``, then for the scheduler's step noise. That is exactly what diffusers'
StableDiffusionPipeline does when called once per image with that generator, so both give the same picture.
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


def initial_noise(generators: list["torch.Generator"], channels: int, latent_height: int, latent_width: int) -> "torch.Tensor":
    """Unscaled initial latents, one draw per image from its own generator (float32, on the CPU)."""
    import torch

    return torch.cat(
        [torch.randn((1, channels, latent_height, latent_width), generator=g, dtype=torch.float32) for g in generators]
    )
