"""diffusers' own StableDiffusionPipeline as the reference every sdtrt image is checked against.

The A1111 -> diffusers mapping is restated here from diffusers' documentation on purpose: if sdtrt's
sampler table drifts from it, the parity tests fail.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import torch
import diffusers as d

# A1111 name -> diffusers scheduler, as diffusers' documentation lists the equivalents.
_K = {"use_karras_sigmas": True, "timestep_spacing": "linspace"}  # see REFERENCE_SCHEDULES below
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
    "DPM++ 2M SDE Heun": (d.DPMSolverMultistepScheduler, {**_SDE, "solver_type": "heun"}),
    "DPM++ 2M SDE Heun Karras": (d.DPMSolverMultistepScheduler, {**_SDE, "solver_type": "heun", **_K}),
    "DPM++ SDE": (d.DPMSolverSDEScheduler, {}),
    "DPM++ SDE Karras": (d.DPMSolverSDEScheduler, _K),
    "DDIM": (d.DDIMScheduler, {}),
    "PLMS": (d.PNDMScheduler, {}),
    "UniPC": (d.UniPCMultistepScheduler, {}),
    "LCM": (d.LCMScheduler, {}),
}
# A1111's schedule types as diffusers settings. Karras, Exponential (Polyexponential at rho 1) and Beta also take
# "linspace" spacing: k-diffusion spans the model's whole sigma range, which diffusers' Euler-family classes only
# see when the spaced timesteps include both ends (A1111Schedules below checks the sigmas themselves).
REFERENCE_SCHEDULES = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
    "Exponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Uniform": {"timestep_spacing": "linspace"},
    "Polyexponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    "Beta": {"use_beta_sigmas": True, "timestep_spacing": "linspace"},
}


# A1111 1.9+'s samplers table: the schedule each of these samplers runs when the user leaves it on "Automatic".
A1111_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM2": "Karras", "DPM2 a": "Karras",
                   "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential"}


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
                     schedule_type="Automatic", guidance_rescale=0.0, **extra):
    """[N, H, W, 3] uint8 from diffusers, one call per image with generator seed+i (the README's seed contract)."""
    original = pipe.scheduler
    images = []
    # A1111's own schedules: its sigmas, handed to the diffusers scheduler (the pipeline's `sigmas`)
    steps_or_sigmas = {"num_inference_steps": steps}
    if schedule_type in A1111_SIGMA_SCHEDULES:
        steps_or_sigmas = {"sigmas": A1111Schedules(original.config).sigmas(schedule_type, steps).tolist()}
        schedule_type = "Automatic"
    for i in range(batch_size):
        pipe.scheduler = reference_scheduler(sampler, original.config, seed + i, schedule_type)
        out = pipe(
            prompt,
            negative_prompt=negative_prompt,
            **steps_or_sigmas,
            guidance_scale=cfg,
            guidance_rescale=guidance_rescale,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed + i),
            output_type="np",
            **extra,  # (a pipeline's own arguments, SDXL's crops_coords_top_left)
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


A1111_SIGMA_SCHEDULES = ("KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM")  # no diffusers setting


def a1111_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A1111's rescale_zero_terminal_snr_abar (modules/sd_models.py): Lin et al.'s Algorithm 1 on sqrt(abar), shifted
    to end at 0 and scaled to keep its start, squared back; its last level then A1111's 4.8973451890853435e-08."""
    root = alphas_cumprod.sqrt()
    start, end = root[0].clone(), root[-1].clone()
    root -= end
    root *= start / (start - end)
    rescaled = root ** 2
    rescaled[-1] = 4.8973451890853435e-08
    return rescaled


class A1111Schedules:
    """A1111's schedule types (modules/sd_schedulers.py and k-diffusion's get_sigmas_*), restated from their
    published definitions with torch as A1111 computes them, for a model's training betas. ``sigmas(name, n)``
    gives the n + 1 noise levels A1111 samples with."""

    AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]  # NVIDIA's AYS page

    def __init__(self, scheduler_config, zero_snr: bool = False, downcast: bool = False):
        betas = torch.linspace(scheduler_config["beta_start"] ** 0.5, scheduler_config["beta_end"] ** 0.5,
                               scheduler_config["num_train_timesteps"], dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod = alphas_cumprod.float()  # as LatentDiffusion registers its buffer
        if downcast or zero_snr:  # A1111's apply_alpha_schedule_override, in its order and dtype
            if downcast:
                self.alphas_cumprod = self.alphas_cumprod.half()
            if zero_snr:
                self.alphas_cumprod = a1111_zero_terminal_snr(self.alphas_cumprod)
            alphas_cumprod = self.alphas_cumprod
        self.model_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).double()  # k-diffusion's DiscreteSchedule
        self.log_sigmas = self.model_sigmas.log()
        self.sigma_min, self.sigma_max = float(self.model_sigmas[0]), float(self.model_sigmas[-1])

    def sigma_to_t(self, sigma):
        dists = torch.log(torch.as_tensor(sigma, dtype=torch.float64)) - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        w = ((self.log_sigmas[low] - torch.log(torch.as_tensor(sigma, dtype=torch.float64)))
             / (self.log_sigmas[low] - self.log_sigmas[high])).clamp(0, 1)
        return (1 - w) * low + w * high

    def t_to_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigmas(self, name: str, n: int, sigma_min: float = 0.0, sigma_max: float = 0.0, rho: float = 0.0,
               alpha: float = 0.6, beta: float = 0.6, old_karras: bool = False) -> torch.Tensor:
        """A1111's get_sigmas with its options: the range it hands the schedule (the model's, 0.1 to 10 with its
        old Karras range, else sigma_min / sigma_max where set), rho (0: the schedule's), Beta's alpha and beta."""
        zero = torch.zeros(1, dtype=torch.float64)
        smin, smax = (0.1, 10.0) if old_karras else (self.sigma_min, self.sigma_max)
        smin, smax = sigma_min or smin, sigma_max or smax
        if name == "Uniform":
            return torch.cat([self.t_to_sigma(torch.linspace(len(self.model_sigmas) - 1, 0, n, dtype=torch.float64)),
                              zero])
        if name == "Karras":
            ramp, rho = torch.linspace(0, 1, n, dtype=torch.float64), rho or 7.0
            return torch.cat([(smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho, zero])
        if name in ("Exponential", "Polyexponential"):  # polyexponential at A1111's rho, 1 unless set
            ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** ((rho or 1.0) if name == "Polyexponential" else 1)
            return torch.cat([torch.exp(ramp * (math.log(smax) - math.log(smin)) + math.log(smin)), zero])
        if name in ("SGM Uniform", "Normal"):
            start, end = self.sigma_to_t(smax), self.sigma_to_t(smin)
            ts = torch.linspace(float(start), float(end), n + 1)[:-1] if name == "SGM Uniform" else \
                torch.linspace(float(start), float(end), n)
            return torch.cat([self.t_to_sigma(ts), zero])
        if name == "Simple":
            stride = len(self.model_sigmas) / n
            return torch.tensor([float(self.model_sigmas[-(1 + int(x * stride))]) for x in range(n)] + [0.0])
        if name == "DDIM":
            stride, out, x = max(len(self.model_sigmas) // n, 1), [], 1
            while x < len(self.model_sigmas):
                out.append(float(self.model_sigmas[x]))
                x += stride
            return torch.tensor(out[::-1] + [0.0])
        if name == "KL Optimal":
            i = torch.arange(n + 1, dtype=torch.float64)
            return torch.tan(i / n * math.atan(smin) + (1.0 - i / n) * math.atan(smax))
        if name == "Align Your Steps":
            levels = self.AYS_SD15
            if n != len(levels):
                ys = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(levels)), np.log(levels[::-1])))
                levels = list(ys[::-1])
            return torch.tensor(list(levels) + [0.0], dtype=torch.float64)
        if name == "Beta":
            from scipy import stats

            ts = [stats.beta.ppf(x, alpha, beta) for x in 1 - np.linspace(0, 1, n)]
            return torch.tensor([smin + x * (smax - smin) for x in ts] + [0.0], dtype=torch.float64)
        raise KeyError(name)


def k_sampling() -> types.ModuleType:
    """k_diffusion.sampling, imported without the package's __init__ (its training kit needs torchvision)."""
    if "k_diffusion.sampling" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        sys.modules.setdefault("k_diffusion", importlib.util.module_from_spec(spec))
        stubs = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.transforms": types.ModuleType("torchvision.transforms")}
        stubs["torchvision.transforms"].functional = types.ModuleType("functional")
        stubs["torchvision"].transforms = stubs["torchvision.transforms"]
        missing = {k: v for k, v in stubs.items() if k not in sys.modules}
        sys.modules.update(missing)
        try:
            importlib.import_module("k_diffusion.sampling")
        finally:
            for name in missing:
                sys.modules.pop(name)
    return sys.modules["k_diffusion.sampling"]
