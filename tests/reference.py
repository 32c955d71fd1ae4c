"""diffusers' own StableDiffusionPipeline as the reference every sdtrt image is checked against.

The A1111 -> diffusers mapping is restated here from diffusers' documentation on purpose: if sdtrt's
sampler table drifts from it, the parity tests fail.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

REFERENCE_SCHEDULERS = {
    "Euler a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg),
    "Euler": lambda cfg: EulerDiscreteScheduler.from_config(cfg),
    "DPM++ 2M": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg),
    "DPM++ 2M Karras": lambda cfg: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
    "DDIM": lambda cfg: DDIMScheduler.from_config(cfg),
    "PLMS": lambda cfg: PNDMScheduler.from_config(cfg),
}

MAX_PIXEL_DIFF = 2  # out of 255: the acceptance tolerance for every served/exported image


def diffusers_images(pipe, *, prompt, negative_prompt="", sampler, steps, cfg, seed, width, height, batch_size=1):
    """[N, H, W, 3] uint8 from diffusers, one call per image with generator seed+i (the README's seed contract)."""
    original = pipe.scheduler
    images = []
    for i in range(batch_size):
        pipe.scheduler = REFERENCE_SCHEDULERS[sampler](original.config)
        out = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=cfg,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed + i),
            output_type="np",
        ).images
        images.append((out[0] * 255).round().astype(np.uint8))
    pipe.scheduler = original
    return np.stack(images)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
