"""The denoising loop, kept visible, shared by the in-process reference runner and the Triton job models.

The U-Net is whatever callable it is handed: an onnxruntime session in-process, a BLS call to the ``unet``
Triton model when served. Uncond and cond go through the U-Net in ONE batched call, as in diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from sdtrt.contract.samplers import set_timesteps, step_kwargs
from sdtrt.pipeline.conditioning import guided as with_uncond


class UNet(Protocol):
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """sample [N,C,h,w], timestep [N] float32, the conditioning inputs by name (``sdtrt.pipeline.conditioning``: the
        text context [N,T,H], SDXL's added conditions) -> noise prediction [N,C,h,w]."""


def prepare_latents(scheduler: Any, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Set the schedule (on the noise's device, as diffusers' pipelines do) and scale the initial noise.
    init_noise_sigma is only right after set_timesteps."""
    set_timesteps(scheduler, steps, noise.device)
    return noise * scheduler.init_noise_sigma


def strength_timesteps(scheduler: Any, steps: int, strength: float, device: torch.device | None = None) -> torch.Tensor:
    """img2img's schedule (diffusers' get_timesteps): only the last int(steps * strength) steps are run."""
    set_timesteps(scheduler, steps, device)
    # A1111's DDIM schedule may run a step more than asked: the strength is a share of the steps it runs
    steps = getattr(scheduler, "num_inference_steps", None) or steps
    start = max(steps - min(int(steps * strength), steps), 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


@dataclass
class Pass:
    """One denoising pass: its scheduler (schedulers keep run state: a fresh one per pass), the per-image
    generators its noisy steps draw from, and the steps it runs (None: all of the scheduler's)."""

    scheduler: Any
    generators: list[torch.Generator]
    timesteps: torch.Tensor | None = None


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: off at ``scale`` <= 1, as in diffusers. With several ``cond_weights`` (A1111's
    AND), each subprompt pulls away from the uncond by its weight: uncond + scale * sum(w_k * (cond_k - uncond))."""

    scale: float
    cond_weights: tuple[float, ...] = (1.0,)
    rescale: float = 0.0  # diffusers' guidance_rescale


@dataclass(frozen=True)
class Inpainting:
    """What inpainting adds to the loop: ``unet_extra`` (inpainting U-Nets: mask and masked-image latents, one row
    per image) appended to the U-Net input's channels; ``after_step(i, latents)`` replacing the latents after step
    i (masked blending, for ordinary U-Nets)."""

    unet_extra: torch.Tensor | None = None
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None


def denoise(
    run: Pass,
    unet: UNet,
    latents: torch.Tensor,
    context: dict[str, torch.Tensor] | Callable[[int], dict[str, torch.Tensor]],
    guidance: Guidance,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    inpainting: Inpainting = Inpainting(),
) -> torch.Tensor:
    """Run the pass's steps. With guidance, ``context``'s rows are [uncond x N, cond x N]
    (``sdtrt.pipeline.conditioning.unet_conditioning``), with several cond weights [uncond, cond_1, ..., cond_K]
    (x N each), without it cond only; a callable gives each 0-based step's (prompt editing changes the
    conditioning as the steps go)."""
    scheduler, generators = run.scheduler, run.generators
    guidance_scale, cond_weights = guidance.scale, guidance.cond_weights
    unet_extra, after_step = inpainting.unet_extra, inpainting.after_step
    timesteps = run.timesteps
    guided = with_uncond(guidance_scale, len(cond_weights))
    copies = len(cond_weights) + 1 if guided else 1
    extra = step_kwargs(scheduler, generators)
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    if unet_extra is not None:
        unet_extra = torch.cat([unet_extra] * copies)
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * copies)
        model_input = scheduler.scale_model_input(model_input, t)
        if unet_extra is not None:
            model_input = torch.cat([model_input, unet_extra], dim=1)
        timestep = torch.full((model_input.shape[0],), float(t), dtype=torch.float32, device=latents.device)
        noise_pred = unet(model_input, timestep, context(i) if callable(context) else context)
        if guided:
            uncond, *conds = noise_pred.chunk(copies)
            noise_pred = uncond + sum(w * guidance_scale * (cond - uncond) for w, cond in zip(cond_weights, conds))
            if guidance.rescale > 0:
                # diffusers' pipeline module costs each job stub ~3 s to import (transformers, scipy): only a
                # request that rescales pays it
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                noise_pred = rescale_noise_cfg(noise_pred, conds[0], guidance_rescale=guidance.rescale)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if after_step is not None:
            latents = after_step(i, latents)
        if on_step is not None:
            on_step(i + 1, len(timesteps), latents)
    return latents
