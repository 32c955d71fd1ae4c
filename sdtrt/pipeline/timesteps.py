"""A1111's own timestep samplers: DDIM, DDIM CFG++ and PLMS as A1111 (1.10) runs them, on its timesteps.

A1111 runs DDIM and PLMS with functions of its own (modules/sd_samplers_timesteps_impl.py), not k-diffusion's nor
diffusers': integer timesteps spaced 1000 // steps apart from 1 (20 steps: 1, 51, ..., 951, of which the model
sees all but the first: 19 calls), the noise prediction guided by its CFG denoiser, and the CompVis DDIM update.
DDIM CFG++ (Chung et al. 2024, "Manifold-constrained classifier free guidance") is A1111's DDIM taking its x0 from
the guided prediction at A1111's CFG scale / 12.5 and its direction to the next level from the unconditional one.
diffusers' DDIMScheduler and PNDMScheduler space their timesteps their own way ("leading", a step offset) and end
at alpha 1 or the first level, so their pictures are not A1111's; these functions are, in the A1111-exact mode.

``TSchedule`` stands where a diffusers scheduler stands in ``sdtrt.pipeline.denoise`` (as ``KSchedule`` does for
k-diffusion): it holds a pass's timesteps, counts img2img's and the hires pass's steps as A1111's
``setup_img2img_steps`` does, and adds img2img's noise at A1111's level. ``sdtrt.pipeline.denoise.t_denoise``
runs the function on the loop's U-Net. Step noise (DDIM with eta) is drawn as A1111 draws it, through
k-diffusion's ``torch.randn_like``: each image's generator, or its NV numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.samplers import Sampler, SamplerSettings, UniPcOptions, diffusers_class
from sdtrt.pipeline.ksampling import NvStepNoise, ThreadNoise, image_noise, k_diffusion, sampling_alphas_cumprod

TRAINING_STEPS = 1000
CFGPP_SCALE = 1 / 12.5  # A1111 maps its CFG scale 0..12.5 onto CFG++'s guidance 0..1

# The model a timestep function drives: (x, timestep) -> (guided noise prediction, unconditional one); UniPC's
# timesteps are fractional.
EpsModel = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (0-based step, x, predicted x0)


def a1111_timesteps(steps: int) -> torch.Tensor:
    """CompVisSampler.get_timesteps: every 1000 // steps training steps from 0, plus one, the last clipped to 999."""
    return torch.clip(torch.arange(0, TRAINING_STEPS, TRAINING_STEPS // steps) + 1, 0, TRAINING_STEPS - 1)


class _Levels:
    """A timestep list's noise levels as A1111 computes them: alphas at the timesteps (float32, as the model's
    buffer), the previous levels in float64 (the first one: the training schedule's first)."""

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor):
        self.alphas = alphas_cumprod[timesteps]
        previous = torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))
        self.previous = alphas_cumprod[previous].double()
        self.sqrt_one_minus = torch.sqrt(1 - self.alphas)

    def ddim_sigmas(self, eta: float) -> np.ndarray:
        a, prev = self.alphas.double().numpy(), self.previous.numpy()
        return eta * np.sqrt((1 - prev) / (1 - a) * (1 - a / prev))

    def pred_x0(self, x: torch.Tensor, eps: torch.Tensor, index: int) -> torch.Tensor:
        return (x - self.sqrt_one_minus[index].item() * eps) / math.sqrt(self.alphas[index].item())


def sample_ddim(model: EpsModel, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                eta: float = 0.0, callback: Callback | None = None, cfgpp: bool = False) -> torch.Tensor:
    """DDIM from the last timestep down to the first (which it reaches but never evaluates). With ``cfgpp`` the
    direction to the next level is the unconditional prediction's (CFG++); the guided one gives the x0 either way."""
    levels = _Levels(alphas_cumprod, timesteps)
    sigmas = levels.ddim_sigmas(eta)
    randn_like = k_diffusion()[0].torch.randn_like  # A1111's step noise: the image's generator, as it routes it
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        eps, eps_uncond = model(x, int(timesteps[index]))
        a_prev, sigma = levels.previous[index].item(), float(sigmas[index])
        pred_x0 = levels.pred_x0(x, eps, index)
        direction = math.sqrt(1.0 - a_prev - sigma ** 2) * (eps_uncond if cfgpp else eps)
        x = math.sqrt(a_prev) * pred_x0 + direction + sigma * randn_like(x)
        if callback is not None:
            callback(i, x, pred_x0)
    return x


def sample_ddim_cfgpp(model: EpsModel, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                      eta: float = 0.0, callback: Callback | None = None) -> torch.Tensor:
    return sample_ddim(model, x, timesteps, alphas_cumprod, eta, callback, cfgpp=True)


# Adams-Bashforth weights of PLMS's pseudo linear multistep, by how many earlier predictions it has (newest first)
_PLMS_WEIGHTS = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}


def sample_plms(model: EpsModel, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                callback: Callback | None = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022) as A1111 runs it: a pseudo improved Euler first step (two model calls), then linear
    multistep steps of rising order (up to 4) over the noise predictions."""
    levels = _Levels(alphas_cumprod, timesteps)

    def step(x: torch.Tensor, eps: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        a_prev = levels.previous[index].item()
        pred_x0 = levels.pred_x0(x, eps, index)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1.0 - a_prev) * eps, pred_x0

    earlier: list[torch.Tensor] = []  # the last three noise predictions, oldest first
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        eps = model(x, int(timesteps[index]))[0]
        if not earlier:
            ahead, _ = step(x, eps, index)
            combined = (eps + model(ahead, int(timesteps[max(index - 1, 0)]))[0]) / 2
        else:
            weights, divisor = _PLMS_WEIGHTS[len(earlier)]
            history = [eps, *reversed(earlier)]
            combined = sum(w * e for w, e in zip(weights, history)) / divisor
        x, pred_x0 = step(x, combined, index)
        earlier = [*earlier, eps][-3:]
        if callback is not None:
            callback(i, x, pred_x0)
    return x




def _unipc_levels(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) at continuous times ``t`` as the UniPC authors' NoiseScheduleVP('discrete') has them: log
    alpha linear between the training steps, step n at time (n + 1) / 1000."""
    log_alphas = 0.5 * torch.log(alphas_cumprod)
    grid = torch.linspace(0.0, 1.0, len(log_alphas) + 1)[1:]
    right = torch.searchsorted(grid, t).clamp(1, len(grid) - 1)
    left = right - 1
    log_alpha = log_alphas[left] + (t - grid[left]) * (log_alphas[right] - log_alphas[left]) / (grid[right] - grid[left])
    return torch.exp(log_alpha), torch.sqrt(1.0 - torch.exp(2.0 * log_alpha))


def _unipc_times(alphas_cumprod: torch.Tensor, start: float, steps: int, skip_type: str) -> torch.Tensor:
    """The UniPC authors' get_time_steps from ``start`` to 1 / 1000: evenly spaced in time, in its square root
    (time_quadratic), or in log-SNR (logSNR: lambda's inverse read off the discrete schedule, log alpha linear
    between its steps)."""
    end = 1 / TRAINING_STEPS
    if skip_type == "time_quadratic":
        return torch.linspace(start ** 0.5, end ** 0.5, steps + 1) ** 2
    if skip_type != "logSNR":
        return torch.linspace(start, end, steps + 1)
    ends = torch.tensor([start, end])
    alpha, sigma = _unipc_levels(alphas_cumprod, ends)
    lambdas = torch.linspace(*(torch.log(alpha) - torch.log(sigma)).tolist(), steps + 1)
    log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lambdas), -2.0 * lambdas)
    table = (0.5 * torch.log(alphas_cumprod)).flip(0)  # ascending, as the times descend
    grid = torch.linspace(0.0, 1.0, len(table) + 1)[1:].flip(0)
    right = torch.searchsorted(table, log_alpha).clamp(1, len(table) - 1)
    left = right - 1
    return grid[left] + (log_alpha - table[left]) * (grid[right] - grid[left]) / (table[right] - table[left])


def sample_unipc(model: EpsModel, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                 callback: Callback | None = None, img2img: bool = False,
                 options: UniPcOptions = UniPcOptions()) -> torch.Tensor:
    """UniPC as A1111 runs it (sd_samplers_timesteps_impl.unipc): len(timesteps) steps from time 1 (img2img: the
    last timestep's + 1, as A1111) to 1 / 1000, spaced by its skip type, the U-Net at (t - 1 / 1000) x 1000 (no
    rounding), multistep of its variant and order (A1111's options: bh1, 3, time_uniform, lower orders for the last
    steps), no corrector after the last. The update is diffusers' UniPCMultistepScheduler (the same
    predictor-corrector), its noise levels set to those times'."""
    steps = len(timesteps)
    start = float(timesteps[-1]) / TRAINING_STEPS + 1 / TRAINING_STEPS if img2img else 1.0
    times = _unipc_times(alphas_cumprod.float(), start, steps, options.skip_type)
    alphas, sigmas = _unipc_levels(alphas_cumprod, times)
    model_times = (times - 1 / TRAINING_STEPS) * TRAINING_STEPS
    scheduler = diffusers_class("UniPCMultistepScheduler")(
        solver_order=options.order, solver_type=options.variant, lower_order_final=options.lower_order_final,
        predict_x0=True)
    scheduler.set_timesteps(steps)
    scheduler.sigmas = sigmas / alphas  # (diffusers' sigma: the noise-to-signal ratio, alpha = 1 / sqrt(1 + s^2))
    scheduler.timesteps = model_times[:-1]
    for i in range(steps):
        t = float(model_times[i])
        eps = model(x, t)[0]
        pred_x0 = (x - sigmas[i] * eps) / alphas[i]
        x = scheduler.step(eps, scheduler.timesteps[i], x, return_dict=False)[0]
        if callback is not None:
            callback(i, x, pred_x0)
    return x


T_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"ddim": sample_ddim, "ddim_cfgpp": sample_ddim_cfgpp,
                                                       "plms": sample_plms, "unipc": sample_unipc}
# The functions that evaluate the model at every timestep handed to them (DDIM and PLMS reach the first one but
# never evaluate there) and take img2img's start from the timesteps
EVERY_TIMESTEP = ("unipc",)



class TSchedule:
    """One pass's A1111 timestep sampler: its timesteps for a step count and what the job code asks of a
    scheduler (``set_timesteps``, ``timesteps`` as one entry per step it runs, ``init_noise_sigma``, ``add_noise``,
    img2img's ``strength_timesteps``)."""

    order = 1
    init_noise_sigma = 1.0  # A1111 starts its timestep samplers from the seed's noise as drawn

    def __init__(self, sampler: Sampler, base_config: dict[str, Any], settings: SamplerSettings,
                 seeds: Sequence[int]):
        self.sampler, self.settings, self.seeds = sampler, settings, list(seeds)
        self.function = T_FUNCTIONS[sampler.t_function]
        self.alphas_cumprod = sampling_alphas_cumprod(base_config, settings)
        # A1111's always_discard_next_to_last_sigma asks its timestep samplers for one step more (and discards
        # nothing: they have no sigmas)
        self.extra_step = int(settings.always_discard_next_to_last_sigma)
        self.v_prediction = base_config.get("prediction_type") == "v_prediction"
        self.cfgpp = sampler.t_function == "ddim_cfgpp"
        self.run_timesteps = self.timesteps = None
        self.noise_level = TRAINING_STEPS - 1  # the timestep img2img's noise is added at
        self.nv_noise: NvStepNoise | None = None  # the step noise when the request's source is NV
        self.img2img = False  # strength_timesteps ran: the pass starts at its timesteps' level (UniPC)
        self.steps_asked = 0

    def set_timesteps(self, steps: int, device: torch.device | None = None) -> None:
        self.steps_asked = steps
        self.run_timesteps = self._checked(a1111_timesteps(steps + self.extra_step), "steps")
        self.timesteps = torch.arange(self._steps_run(len(self.run_timesteps)), device=device)

    def _steps_run(self, timesteps: int) -> int:
        every = self.sampler.t_function in EVERY_TIMESTEP
        return timesteps if every else max(timesteps - 1, 0)

    def _checked(self, timesteps: torch.Tensor, field: str) -> torch.Tensor:
        """UniPC's timesteps, at least its order of them: A1111 stops with an assertion below that."""
        order = self.settings.unipc.order
        if self.sampler.t_function == "unipc" and 0 < len(timesteps) < order:
            raise InvalidRequest(field, len(timesteps), f"at least {order} steps for UniPC on A1111's code "
                                 f"path (its order; img2img and the hires fix run denoising strength x steps of "
                                 "them): more steps, or k_diffusion off for diffusers' UniPC")
        return timesteps

    @property
    def num_inference_steps(self) -> int:
        return self._steps_run(len(self.run_timesteps))

    @property
    def launch_steps(self) -> int:
        """The step count A1111's CFG denoiser divides its calls by (skip_early_cond): the steps asked for, or
        img2img's timesteps plus one (its launch_sampling(t_enc + 1))."""
        return len(self.run_timesteps) + 1 if self.img2img else self.steps_asked


    def strength_timesteps(self, steps: int, strength: float, device: torch.device | None = None,
                           second_pass: bool = False) -> torch.Tensor:
        """setup_img2img_steps and sample_img2img: of the timesteps for ``steps``, the first int(strength * steps),
        the noise added at the next one; a hires pass (A1111 gives it its step count) stretches the schedule to
        steps / strength and keeps steps - 1 of them."""
        strength = min(strength, 0.999)
        if second_pass:
            total, kept = (int(steps / strength), steps - 1) if strength > 0 else (0, 0)
        else:
            total, kept = steps, int(strength * steps)
        if kept <= 0:
            self.run_timesteps, self.timesteps = torch.zeros(0, dtype=torch.long), torch.zeros(0, device=device)
            return self.timesteps
        if total > TRAINING_STEPS:  # A1111's timesteps are 1000 // steps apart: none left between them
            raise InvalidRequest("denoising_strength", strength, f"at least {steps / TRAINING_STEPS:.3f} for "
                                 f"{steps} hires steps with {self.sampler.name!r} (A1111 spaces its timesteps 1000 "
                                 f"// (steps / strength) apart)")
        every = a1111_timesteps(total + self.extra_step)
        self.noise_level = int(every[kept])
        self.run_timesteps = self._checked(every[:kept], "denoising_strength")
        self.timesteps = torch.arange(self._steps_run(kept), device=device)
        self.img2img = True
        return self.timesteps

    def add_noise(self, init: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha = self.alphas_cumprod[self.noise_level]
        return init * torch.sqrt(alpha) + noise * torch.sqrt(1 - alpha)

    @staticmethod
    def nearest_timestep(t: float) -> int:
        """A1111's apply_refiner on its timestep samplers: the timestep, truncated (UniPC's are fractional)."""
        return int(t)

    def extra_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """A1111's extra noise for img2img and the hires pass: the same noise again, times the option, at the
        picture's scale where the noise is added (its timestep samplers' latents are not in sigma units)."""
        return noise * self.settings.img2img_extra_noise * torch.sqrt(self.alphas_cumprod[self.noise_level])

    def noise_like(self, generators: Sequence[torch.Generator]) -> ThreadNoise:
        return ThreadNoise(self.nv_noise or image_noise(generators))

    def eps(self, output: torch.Tensor, x: torch.Tensor, timestep: int) -> torch.Tensor:
        """The U-Net's output as a noise prediction (a v-prediction model's converted, as A1111's
        CompVisTimestepsVDenoiser does)."""
        if not self.v_prediction:
            return output
        alpha = self.alphas_cumprod[int(timestep)]  # (UniPC's fractional timesteps truncated, as A1111's)
        return torch.sqrt(alpha) * output + torch.sqrt(1 - alpha) * x

    def arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"timesteps": self.run_timesteps, "alphas_cumprod": self.alphas_cumprod}
        if self.sampler.t_function == "unipc":
            arguments["img2img"], arguments["options"] = self.img2img, self.settings.unipc
        if self.sampler.eta is not None:
            arguments["eta"] = self.settings.eta_for(self.sampler)
        return arguments
