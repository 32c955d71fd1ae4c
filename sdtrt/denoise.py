"""The denoising loop, kept visible, shared by the in-process reference runner and the Triton scheduler model.

The U-Net is whatever callable it is handed: an onnxruntime session in-process, a BLS call to the ``unet``
Triton model when served. Uncond and cond go through the U-Net in ONE batched call, as in diffusers.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from sdtrt.request import Txt2ImgRequest
from sdtrt.samplers import make_scheduler, step_kwargs
from sdtrt.seeds import image_seeds, initial_noise, make_generators
from sdtrt.spec import ModelSpec


class UNet(Protocol):
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """sample [N,C,h,w], timestep [N] float32, context [N,T,H] -> noise prediction [N,C,h,w]."""


def prepare_latents(scheduler: Any, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Set the schedule and scale the initial noise. init_noise_sigma is only right after set_timesteps."""
    scheduler.set_timesteps(steps)
    return noise * scheduler.init_noise_sigma


def denoise(
    scheduler: Any,
    unet: UNet,
    latents: torch.Tensor,
    context: torch.Tensor,
    guidance_scale: float,
    generators: list[torch.Generator],
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run every scheduler step. With guidance, ``context`` is cat([uncond, cond]) and has 2x the images.

    Guidance is off at guidance_scale <= 1, as in diffusers (then ``context`` holds cond only).
    """
    guided = guidance_scale > 1.0
    extra = step_kwargs(scheduler, generators)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        timestep = torch.full((model_input.shape[0],), float(t), dtype=torch.float32)
        noise_pred = unet(model_input, timestep, context)
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents


def guidance_context(uncond: torch.Tensor, cond: torch.Tensor, images: int, guidance_scale: float) -> torch.Tensor:
    """U-Net context for ``images`` images of one prompt: [uncond x N, cond x N] with guidance, [cond x N] without."""
    if guidance_scale > 1.0:
        return torch.cat([uncond] * images + [cond] * images)
    return torch.cat([cond] * images)


def txt2img_latents(
    spec: ModelSpec,
    request: Txt2ImgRequest,
    uncond: torch.Tensor,
    cond: torch.Tensor,
    unet: UNet,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Everything between the text encoder and the VAE for a validated request with resolved seeds.

    Returns the final latents already divided by the VAE scaling factor (the decoder's input) and the
    seed of each image.
    """
    seeds = image_seeds(request.seed, request.batch_size)
    generators = make_generators(seeds)
    f = spec.vae_scale_factor
    scheduler = make_scheduler(request.sampler, spec.scheduler_config, request.schedule_type, seeds)
    subseeds = image_seeds(request.subseed, request.batch_size) if request.subseed_strength > 0 else None
    noise = initial_noise(generators, spec.latent_channels, request.height // f, request.width // f,
                          subseeds, request.subseed_strength)
    latents = prepare_latents(scheduler, noise, request.steps)
    context = guidance_context(uncond, cond, request.batch_size, request.guidance_scale)
    latents = denoise(scheduler, unet, latents, context, request.guidance_scale, generators, on_step)
    return latents / spec.vae_scaling_factor, seeds
