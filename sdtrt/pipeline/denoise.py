"""The denoising loop, kept visible, shared by the in-process reference runner and the Triton job models.

The U-Net is whatever callable it is handed: an onnxruntime session in-process, a BLS call to the ``unet``
Triton model when served. Uncond and cond go through the U-Net in ONE batched call, as in diffusers (the jobs'
U-Net splits it where their texts have different lengths, as A1111 does: ``sdtrt.pipeline.jobs.TextLengths``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.samplers import set_timesteps, step_kwargs
from sdtrt.pipeline.conditioning import guided as with_uncond
from sdtrt.pipeline.ksampling import KSchedule
from sdtrt.pipeline.soft_inpainting import SoftInpainting
from sdtrt.pipeline.timesteps import CFGPP_SCALE, TSchedule
from sdtrt.requests.fields import MAX_STEPS


class UNet(Protocol):
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: dict[str, torch.Tensor]) -> torch.Tensor:
        """sample [N,C,h,w], timestep [N] float32, the conditioning inputs by name (``sdtrt.pipeline.conditioning``: the
        text context [N,T,H], SDXL's added conditions) -> noise prediction [N,C,h,w]."""


def prepare_latents(scheduler: Any, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Set the schedule (on the noise's device, as diffusers' pipelines do) and scale the initial noise.
    init_noise_sigma is only right after set_timesteps."""
    set_timesteps(scheduler, steps, noise.device)
    return noise * (scheduler.txt2img_noise_scale if isinstance(scheduler, KSchedule) else scheduler.init_noise_sigma)


def strength_timesteps(scheduler: Any, steps: int, strength: float, device: torch.device | None = None,
                       second_pass: bool = False, fix_steps: bool = False) -> torch.Tensor:
    """img2img's schedule (diffusers' get_timesteps): only the last int(steps * strength) steps are run (a
    k-diffusion sampler and A1111's timestep ones count them as A1111 does, which tells img2img from a hires fix's
    ``second_pass``). ``fix_steps``: A1111's img2img_fix_steps, counted as its second pass is, on every path (a
    diffusers class runs the hires pass as diffusers' img2img does)."""
    if isinstance(scheduler, (KSchedule, TSchedule)):
        return scheduler.strength_timesteps(steps, strength, device, second_pass or fix_steps)
    fixed = fix_steps and 0 < strength < 1  # the last ``steps`` of a schedule for steps / strength
    total = int(steps / strength) if fixed else steps
    set_timesteps(scheduler, total, device)
    # A1111's DDIM schedule may run a step more than asked: the strength is a share of the steps it runs
    total = getattr(scheduler, "num_inference_steps", None) or total
    run = steps if fixed else min(int(total * strength), total)
    start = max(total - run, 0) * scheduler.order
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
    eta: float = 0.0  # for a diffusers class whose step takes one (DDIM)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: off at ``scale`` <= 1, as in diffusers. With several ``cond_weights`` (A1111's
    AND), each subprompt pulls away from the uncond by its weight: uncond + scale * sum(w_k * (cond_k - uncond)).
    ``min_uncond_sigma``: A1111's "NGMS", every other model call below that sigma skips the uncond (k-diffusion
    samplers; A1111's timestep samplers compare it with the timestep)."""

    scale: float
    cond_weights: tuple[float, ...] = (1.0,)
    rescale: float = 0.0  # diffusers' guidance_rescale
    min_uncond_sigma: float = 0.0
    always_uncond: bool = False  # the uncond runs at any scale (CFG++ steps along it)
    min_uncond_all: bool = False  # NGMS on every call, not every other one
    skip_early: float = 0.0  # A1111's skip_early_cond: calls / its step count up to this skip the uncond

    def skips_uncond(self, call: int, total: int, level: float) -> bool:
        """Whether A1111's CFG denoiser leaves the uncond out of its ``call``-th call (0-based) of ``total`` (its
        sampler's steps, twice for second-order ones) at noise level ``level`` (sigma, or the timestep)."""
        if self.copies == 1:
            return False
        if self.skip_early > 0 and call / total <= self.skip_early:
            return True
        return (call % 2 == 1 or self.min_uncond_all) and self.min_uncond_sigma > 0 and level < self.min_uncond_sigma

    @property
    def with_uncond(self) -> bool:
        return self.always_uncond or with_uncond(self.scale, len(self.cond_weights))

    @property
    def copies(self) -> int:
        """The latents' copies in one U-Net call: the uncond's and each subprompt's, or the cond's alone."""
        return len(self.cond_weights) + 1 if self.with_uncond else 1

    def combine(self, uncond: torch.Tensor, conds: list[torch.Tensor], scale: float | None = None) -> torch.Tensor:
        scale = self.scale if scale is None else scale
        return uncond + sum(w * scale * (cond - uncond) for w, cond in zip(self.cond_weights, conds))


def _rescaled(guidance: Guidance, guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    # diffusers' pipeline module costs each job stub ~3 s to import (transformers, scipy): only a request that
    # rescales pays it
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    return rescale_noise_cfg(guided, cond, guidance_rescale=guidance.rescale)


@dataclass(frozen=True)
class Inpainting:
    """What inpainting adds to the loop: ``unet_extra`` (inpainting U-Nets: mask and masked-image latents, one row
    per image) appended to the U-Net input's channels; ``after_step(i, latents)`` replacing the latents after step
    i (masked blending, for ordinary U-Nets)."""

    unet_extra: torch.Tensor | None = None
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    keep: tuple[torch.Tensor, torch.Tensor] | None = None  # (the picture's latents, the mask): k-diffusion's way
    soft: SoftInpainting | None = None  # A1111's Soft Inpainting: how ``keep`` blends

    def kept(self, latents: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """``latents`` with the picture's kept outside the mask (``keep``; unchanged without one), at noise level
        ``sigma`` (None: the result, after the last step)."""
        if self.keep is None:
            return latents
        picture, mask = self.keep
        if self.soft is not None:  # (A1111's Soft Inpainting leaves the result as sampled)
            return latents if sigma is None else self.soft.blend(picture, latents, mask, sigma)
        return picture * (1 - mask) + mask * latents


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
    if isinstance(run.scheduler, KSchedule):
        return k_denoise(run, unet, latents, context, guidance, on_step, inpainting)
    if isinstance(run.scheduler, TSchedule):
        return t_denoise(run, unet, latents, context, guidance, on_step, inpainting)
    scheduler, generators = run.scheduler, run.generators
    unet_extra, after_step = inpainting.unet_extra, inpainting.after_step
    timesteps = run.timesteps
    guided = guidance.with_uncond
    copies = guidance.copies
    extra = step_kwargs(scheduler, generators, run.eta)
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
            noise_pred = guidance.combine(uncond, conds)
            if guidance.rescale > 0:
                noise_pred = _rescaled(guidance, noise_pred, conds[0])
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if after_step is not None:
            latents = after_step(i, latents)
        if on_step is not None:
            on_step(i + 1, len(timesteps), latents)
    return latents


MAX_K_CALLS = 3 * MAX_STEPS  # three calls a step at the most steps: what a fixed-step sampler (DPM fast) makes


def _rows(context: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
    return {name: rows[start:] for name, rows in context.items()}


def k_denoise(
    run: Pass,
    unet: UNet,
    latents: torch.Tensor,
    context: dict[str, torch.Tensor] | Callable[[int], dict[str, torch.Tensor]],
    guidance: Guidance,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    inpainting: Inpainting = Inpainting(),
) -> torch.Tensor:
    """``denoise`` for a k-diffusion sampler (``run.scheduler`` a KSchedule): its function drives the model A1111
    gives it, k-diffusion's discrete denoiser around the U-Net (fractional timesteps, input scaling) with
    guidance on the denoised latents. ``context`` and ``inpainting`` as for ``denoise``; an ordinary U-Net's
    inpainting keeps the picture outside the mask in every denoised estimate and in the result."""
    schedule: KSchedule = run.scheduler
    n, sigmas = latents.shape[0], schedule.sigmas[schedule.begin:]
    copies = guidance.copies
    extra = None if inpainting.unet_extra is None else torch.cat([inpainting.unet_extra] * copies)
    state = {"step": 0, "calls": 0, "rows": 0}

    def network(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The U-Net as k-diffusion's denoiser calls it: scaled input, fractional timesteps."""
        ctx = context(state["step"]) if callable(context) else context
        start = state["rows"]
        if extra is not None:
            sample = torch.cat([sample, extra[start:]], dim=1)
        return unet(sample, t.to(torch.float32), _rows(ctx, start) if start else ctx)

    schedule.denoiser.inner_model = network

    def model(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        if state["calls"] >= MAX_K_CALLS:  # DPM adaptive picks its own step count: its work is bounded here
            raise InvalidRequest("sampler", schedule.sampler.name, f"a sampler that needs at most {MAX_K_CALLS} "
                                 "U-Net calls; this one needed more for the request: use a fixed-step sampler")
        skip = guidance.skips_uncond(state["calls"], schedule.launch_steps, float(sigma[0]))
        state["calls"] += 1
        state["rows"] = n if skip else 0  # the uncond's rows come first: skipping it starts at the first cond's
        k = copies - 1 if skip else copies
        denoised = schedule.denoiser(torch.cat([x] * k), torch.cat([sigma] * k))
        if copies > 1:
            parts = list(denoised.chunk(k))
            uncond, conds = (parts[0], parts) if skip else (parts[0], parts[1:])
            combined = guidance.combine(uncond, conds, 1.0 if skip else None)
            if guidance.rescale > 0:  # diffusers' rescale is of noise predictions: x - sigma * eps = denoised
                s = sigma.reshape(-1, 1, 1, 1)
                combined = x - s * _rescaled(guidance, (x - combined) / s, (x - conds[0]) / s)
            denoised = combined
        return inpainting.kept(denoised, float(sigma[0]))

    def callback(info: dict[str, Any]) -> None:
        state["step"] = info["i"] + 1
        if on_step is not None:
            on_step(min(info["i"] + 1, len(sigmas) - 1), len(sigmas) - 1, info["denoised"])

    with schedule.noise_like(run.generators):
        latents = schedule.function(model, latents, callback=callback, disable=True,
                                    **schedule.arguments(latents, run.generators))
    return inpainting.kept(latents)


def t_denoise(
    run: Pass,
    unet: UNet,
    latents: torch.Tensor,
    context: dict[str, torch.Tensor] | Callable[[int], dict[str, torch.Tensor]],
    guidance: Guidance,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    inpainting: Inpainting = Inpainting(),
) -> torch.Tensor:
    """``denoise`` for A1111's own timestep samplers (``run.scheduler`` a TSchedule): its function drives the
    U-Net through A1111's CFG denoiser, on noise predictions. As A1111's does, the denoiser counts its calls for
    prompt editing, compares NGMS's threshold with the timestep, blends an ordinary U-Net's inpainting picture into
    its input (not into the sampler's latents) and, for CFG++, scales the guidance by 1 / 12.5."""
    schedule: TSchedule = run.scheduler
    n, total = latents.shape[0], len(schedule.timesteps)
    copies = guidance.copies
    extra = None if inpainting.unet_extra is None else torch.cat([inpainting.unet_extra] * copies)
    scale = guidance.scale * (CFGPP_SCALE if schedule.cfgpp else 1.0)
    calls = [0]

    def model(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = inpainting.kept(x, t)  # (the model's input only: the sampler's own latents stay as they are)
        ctx = context(calls[0]) if callable(context) else context
        skip = guidance.skips_uncond(calls[0], schedule.launch_steps, t)
        calls[0] += 1
        k, start = (copies - 1, n) if skip else (copies, 0)  # the uncond's rows come first
        sample = torch.cat([x] * k)
        if extra is not None:
            sample = torch.cat([sample, extra[start:]], dim=1)
        timestep = torch.full((sample.shape[0],), float(t), dtype=torch.float32, device=x.device)
        eps = schedule.eps(unet(sample, timestep, _rows(ctx, start) if start else ctx), torch.cat([x] * k), t)
        if copies == 1:
            return eps, eps
        parts = list(eps.chunk(k))
        uncond, conds = (parts[0], parts) if skip else (parts[0], parts[1:])  # skipped: the cond stands in
        guided = guidance.combine(uncond, conds, 1.0 if skip else scale)
        if guidance.rescale > 0:
            guided = _rescaled(guidance, guided, conds[0])
        return guided, uncond

    def callback(i: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if on_step is not None:
            on_step(i + 1, total, pred_x0)

    with schedule.noise_like(run.generators):
        latents = schedule.function(model, latents, callback=callback, **schedule.arguments())
    return inpainting.kept(latents)
