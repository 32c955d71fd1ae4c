"""diffusers' own StableDiffusionPipeline as the reference every sdtrt image is checked against.

The A1111 -> diffusers mapping is restated here from diffusers' documentation on purpose: if sdtrt's
sampler table drifts from it, the parity tests fail.
"""

from __future__ import annotations

import numpy as np
import torch
import diffusers as d

# A1111 name -> diffusers scheduler, as diffusers' documentation lists the equivalents.
_K = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
REFERENCE_SCHEDULERS = {
    "Euler a": (d.EulerAncestralDiscreteScheduler, {}),
    "Euler": (d.EulerDiscreteScheduler, {}),
    "LMS": (d.LMSDiscreteScheduler, {}),
    "LMS Karras": (d.LMSDiscreteScheduler, _K),
    "Heun": (d.HeunDiscreteScheduler, {}),
    "DPM2": (d.KDPM2DiscreteScheduler, {}),
    "DPM2 Karras": (d.KDPM2DiscreteScheduler, _K),
    "DPM2 a": (d.KDPM2AncestralDiscreteScheduler, {}),
    "DPM2 a Karras": (d.KDPM2AncestralDiscreteScheduler, _K),
    "DPM++ 2M": (d.DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (d.DPMSolverMultistepScheduler, _K),
    "DPM++ 2M SDE": (d.DPMSolverMultistepScheduler, _SDE),
    "DPM++ 2M SDE Karras": (d.DPMSolverMultistepScheduler, {**_SDE, **_K}),
    "DPM++ SDE": (d.DPMSolverSDEScheduler, {}),
    "DPM++ SDE Karras": (d.DPMSolverSDEScheduler, _K),
    "DDIM": (d.DDIMScheduler, {}),
    "PLMS": (d.PNDMScheduler, {}),
    "UniPC": (d.UniPCMultistepScheduler, {}),
}
REFERENCE_SCHEDULES = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}


# A1111 1.9+'s samplers table: the schedule each of these samplers runs when the user leaves it on "Automatic".
A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM2": "Karras", "DPM++ 2M SDE": "Exponential"}


def reference_scheduler(sampler: str, config, seed: int, schedule_type: str = "Automatic"):
    cls, kwargs = REFERENCE_SCHEDULERS[sampler]
    if schedule_type == "Automatic":
        schedule_type = A1111_AUTOMATIC.get(sampler, "Automatic")
    kwargs = {**kwargs, **REFERENCE_SCHEDULES[schedule_type]}
    if cls is d.DPMSolverSDEScheduler:  # its Brownian tree is seeded with the image's seed
        kwargs["noise_sampler_seed"] = seed
    return cls.from_config(config, **kwargs)


MAX_PIXEL_DIFF = 2  # out of 255: the acceptance tolerance for every served/exported image


def diffusers_images(pipe, *, prompt, negative_prompt="", sampler, steps, cfg, seed, width, height, batch_size=1,
                     schedule_type="Automatic"):
    """[N, H, W, 3] uint8 from diffusers, one call per image with generator seed+i (the README's seed contract)."""
    original = pipe.scheduler
    images = []
    for i in range(batch_size):
        pipe.scheduler = reference_scheduler(sampler, original.config, seed + i, schedule_type)
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


def sample_picture(width: int = 80, height: int = 64) -> np.ndarray:
    """A deterministic RGB picture with smooth gradients and hard edges (uint8 H x W x 3)."""
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 64 * 4], axis=-1)
    picture[height // 4: height // 2, width // 4: width // 2] = (250, 30, 30)
    return picture.astype(np.uint8)


def sample_mask(width: int = 64, height: int = 64) -> np.ndarray:
    """White (repaint) rectangle right of centre on black, uint8 H x W."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4: 3 * height // 4, width // 2: width - 8] = 255
    return mask


def _run_per_image(pipe, sampler, seed, batch_size, call):
    original = pipe.scheduler
    pipe.set_progress_bar_config(disable=True)
    images = []
    try:
        for i in range(batch_size):
            pipe.scheduler = reference_scheduler(sampler, original.config, seed + i)
            out = call(torch.Generator("cpu").manual_seed(seed + i), i)
            images.append(np.asarray(out) if not isinstance(out, np.ndarray) else out)
    finally:
        pipe.scheduler = original
    return np.stack(images)


def diffusers_img2img(pipe, image, *, prompt, sampler, steps, cfg, strength, seed, batch_size=1, negative_prompt=""):
    """diffusers' StableDiffusionImg2ImgPipeline on the same components, one call per image (seed + i)."""
    p = d.StableDiffusionImg2ImgPipeline(**pipe.components)

    def call(generator, i):
        out = p(prompt, negative_prompt=negative_prompt, image=image if not isinstance(image, list) else image[i],
                strength=strength, num_inference_steps=steps, guidance_scale=cfg, generator=generator,
                output_type="np").images[0]
        return (out * 255).round().astype(np.uint8)

    return _run_per_image(p, sampler, seed, batch_size, call)


def diffusers_inpaint(pipe, image, mask, *, prompt, sampler, steps, cfg, strength, seed, batch_size=1, padding=None):
    """diffusers' StableDiffusionInpaintPipeline, with the original pasted back outside the mask as A1111 does
    (diffusers does that itself only with padding_mask_crop, its "only masked")."""
    p = d.StableDiffusionInpaintPipeline(**pipe.components)

    def call(generator, i):
        out = p(prompt, image=image, mask_image=mask, strength=strength, num_inference_steps=steps, guidance_scale=cfg,
                width=image.width, height=image.height, generator=generator, padding_mask_crop=padding,
                output_type="pil").images[0]
        return out if padding is not None else p.image_processor.apply_overlay(mask, image, out)

    return _run_per_image(p, sampler, seed, batch_size, call)
