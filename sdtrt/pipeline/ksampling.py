"""A1111's k-diffusion samplers: k-diffusion's own sampling functions, run as A1111 runs them.

A1111's samplers are the functions of Katherine Crowson's k-diffusion (``k_diffusion.sampling``), each driving a
denoiser: k-diffusion's discrete DDPM wrapper of the U-Net (its sigma <-> fractional timestep mapping and input
scaling, ``k_diffusion.external``), with classifier-free guidance on top. ``KSchedule`` stands where a diffusers
scheduler stands in ``sdtrt.pipeline.denoise``: it holds the pass's sigmas (A1111's schedule types), knows
img2img's strength as A1111 counts it, and ``k_denoise`` runs the function on the loop's U-Net.

k-diffusion is installed without its dependencies (scripts/setup.sh): the package's ``__init__`` imports its
training and evaluation code (torchvision, CLIP, wandb), which sampling never uses, and PyPI's torchvision is a
CUDA build whose operators fail to load with a CPU torch. ``k_diffusion()`` loads only ``sampling`` and
``external``, with a stand-in for the one torchvision module ``k_diffusion.utils`` binds at import and sampling
never calls.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import sys
import threading
import types
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from sdtrt.contract.errors import UsageError
from sdtrt.contract.philox import nv_randn
from sdtrt.contract.samplers import DEFAULT_RHO, Sampler, SamplerSettings, diffusers_class
from sdtrt.contract.schedules import ALIGN_YOUR_STEPS, SIGMA_SCHEDULES

K_DIFFUSION = "k-diffusion==0.1.1.post1"  # as scripts/setup.sh installs it (with torchdiffeq, --no-deps)
_LOCK = threading.Lock()
_NOISE = threading.local()  # the step noise of the pass this thread runs (k-diffusion draws via torch.randn_like)


class _TorchWithImageNoise(types.ModuleType):
    """torch, as k_diffusion.sampling sees it, except that ``randn_like`` draws the running pass's step noise
    (each image's from its own generator, as A1111 routes it), per thread: several loops share one module."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def randn_like(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        draw = getattr(_NOISE, "draw", None)
        return draw(x) if draw is not None else torch.randn_like(x, *args, **kwargs)


def torchvision_stand_in(**names: Any) -> dict[str, types.ModuleType]:
    """Modules for ``from torchvision.transforms import functional`` (k_diffusion.utils' image helpers; spandrel's
    registry imports ``names`` from it), for a library imported without torchvision; none where it is installed."""
    if "torchvision" in sys.modules:
        return {}
    functional = types.ModuleType("torchvision.transforms.functional")
    for name, value in names.items():
        setattr(functional, name, value)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    return {"torchvision": package, "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional}


def unexecuted_package(module: str, install: str, name: str | None = None) -> None:
    """``module`` in sys.modules as its package with its __init__ not run, so that its submodules import alone (a
    library whose __init__ imports what sdtrt lacks: torchvision, trackers); UsageError saying how to install it
    (``install``: pip's words) where it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise UsageError(f"{name or module} is not installed: scripts/setup.sh installs it (pip install --no-deps "
                         f"{install})")
    sys.modules.setdefault(module, importlib.util.module_from_spec(spec))


@contextlib.contextmanager
def standing_in(stand_ins: dict[str, types.ModuleType]) -> Iterator[None]:
    """``stand_ins`` in sys.modules while a library is imported (or builds what needs them), then gone again, so
    that nothing else takes them for the real modules."""
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def k_diffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """k-diffusion's ``sampling`` and ``external`` modules, loaded once, without the package's ``__init__``."""
    with _LOCK:
        if "k_diffusion.external" in sys.modules:
            return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
        unexecuted_package("k_diffusion", f"{K_DIFFUSION} torchdiffeq", "k-diffusion")
        with standing_in(torchvision_stand_in()):
            sampling = importlib.import_module("k_diffusion.sampling")
            external = importlib.import_module("k_diffusion.external")
        sampling.torch = _TorchWithImageNoise()
        return sampling, external


def sample_restart(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                   callback: Callable | None = None, disable: bool | None = None, s_noise: float = 1.0) -> torch.Tensor:
    """A1111's "Restart" (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), in no library but
    A1111's, on k-diffusion's primitives with k-diffusion's calling convention: Heun steps down the schedule (Euler
    into sigma 0). From 20 steps on, the schedule is redrawn as Karras with the restarts' steps taken out, and where
    the descent passes sigma 0.1 it jumps back to sigma 2 with fresh noise (s_noise times the variance between the
    two) and comes down again on a Karras segment of 9 steps (from 36 steps: twice, steps // 4 steps each)."""
    sampling = k_diffusion()[0]
    extra_args = extra_args or {}
    rows = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    restarts: dict[int, tuple[int, int]] = {}  # index of the sigma after which to restart -> (steps, times)
    if steps >= 20:
        count, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = sampling.get_sigmas_karras(steps - count * times, sigmas[-2].item(), sigmas[0].item(),
                                            device=sigmas.device)
        restarts[int(torch.argmin(abs(sigmas - 0.1)))] = (count + 1, times)
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            count, times = restarts[i + 1]
            top = int(torch.argmin(abs(sigmas - 2.0)))
            if top < i + 1:  # the segment climbs from this sigma back to the one nearest 2, then descends
                segment = sampling.get_sigmas_karras(count, sigmas[i + 1].item(), sigmas[top].item(),
                                                     device=sigmas.device)[:-1]
                pairs += list(zip(segment[:-1], segment[1:])) * times
    state = {"i": 0, "last": None}

    def heun(x: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        denoised = model(x, high * rows, **extra_args)
        d = sampling.to_d(x, high, denoised)
        if callback is not None:
            callback({"x": x, "i": state["i"], "sigma": low, "sigma_hat": high, "denoised": denoised})
        state["i"] += 1
        if low == 0:
            return x + d * (low - high)
        ahead = x + d * (low - high)
        d_ahead = sampling.to_d(ahead, low, model(ahead, low * rows, **extra_args))
        return x + (d + d_ahead) / 2 * (low - high)

    for high, low in pairs:
        last = state["last"]
        if last is not None and last < high:  # a restart: noise back up to the segment's top
            x = x + sampling.torch.randn_like(x) * s_noise * (high ** 2 - last ** 2) ** 0.5
        x = heun(x, high, low)
        state["last"] = low
    return x


# A1111's samplers that are A1111's own functions, not k-diffusion's, under the name the registry gives them.
A1111_FUNCTIONS: dict[str, Callable] = {"sample_restart": sample_restart}


class ThreadNoise:
    def __init__(self, draw: Callable[[torch.Tensor], torch.Tensor]):
        self.draw = draw

    def __enter__(self) -> None:
        _NOISE.draw = self.draw

    def __exit__(self, *exc: Any) -> None:
        _NOISE.draw = None


def image_noise(generators: Sequence[torch.Generator]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Step noise shaped like ``x`` ([N, C, h, w]): image i's from generator i, on the CPU (A1111's ImageRNG)."""
    def draw(x: torch.Tensor) -> torch.Tensor:
        rows = [torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(rows).to(device=x.device, dtype=x.dtype)

    return draw


class NvStepNoise:
    """Step noise from A1111's NV source: each image's philox generator (``sdtrt.contract.philox``) continued one
    offset per draw, as A1111's ImageRNG continues the generator its starting noise came from (``offset``: the
    draws it made before, 1 after the starting noise, 0 for ENSD's fresh generators)."""

    def __init__(self, seeds: Sequence[int], offset: int):
        self.seeds, self.offsets = list(seeds), [offset] * len(seeds)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i, seed in enumerate(self.seeds):
            rows.append(torch.from_numpy(nv_randn(seed, tuple(x.shape[1:]), self.offsets[i])))
            self.offsets[i] += 1
        return torch.stack(rows).to(device=x.device, dtype=x.dtype)


def _beta(steps: int, low: float, high: float, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """A1111's Beta schedule (its options beta_dist_alpha and beta_dist_beta, 0.6 by default): the beta
    distribution's quantiles of evenly spaced points, mapped linearly from ``low`` to ``high``."""
    from scipy import stats  # scipy only for this schedule (k-diffusion's sampling imports it anyway)

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, steps), alpha, beta)
    return np.append(low + quantiles * (high - low), 0.0)


ZERO_TERMINAL_SNR = "Zero Terminal SNR"
_LAST_ALPHA = 4.8973451890853435e-08  # where A1111 puts the last level of a zero-terminal-SNR schedule


def _zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"): sqrt(alphas_cumprod)
    shifted so that the last level is 0 and scaled so that the first keeps its value, the last then set just
    above 0 (as A1111 does: an infinite sigma has no use to a sampler)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = ((root - last) * (first / (first - last))) ** 2
    rescaled[-1] = _LAST_ALPHA
    return rescaled


def sampling_alphas_cumprod(base_config: dict[str, Any], settings: SamplerSettings) -> torch.Tensor:
    """The checkpoint's noise levels (its scheduler config's) as A1111 samples with them: float32 as the model's
    buffer, or cast to fp16 (use_downcasted_alpha_bar, for old seeds), then rescaled to zero terminal SNR where
    the request's noise schedule says (A1111's apply_alpha_schedule_override, in that order and dtype)."""
    DDPMScheduler = diffusers_class("DDPMScheduler")  # the checkpoint's training noise levels (its config)
    alphas_cumprod = DDPMScheduler.from_config(base_config).alphas_cumprod.float()
    if settings.use_downcasted_alpha_bar:
        alphas_cumprod = alphas_cumprod.half()
    if settings.sd_noise_schedule == ZERO_TERMINAL_SNR:
        alphas_cumprod = _zero_terminal_snr(alphas_cumprod)
    return alphas_cumprod


# A1111's samplers marked second_order (sd_samplers_kdiffusion.samplers_k_diffusion): two model calls a step
SECOND_ORDER = frozenset({"sample_dpmpp_sde", "sample_dpmpp_2s_ancestral", "sample_heun", "sample_dpm_2",
                          "sample_dpm_2_ancestral", "sample_restart"})


class KSchedule:
    """One pass's k-diffusion sampler: the sigmas of its schedule type for a step count, and what the job code
    asks of a scheduler (``set_timesteps``, ``timesteps`` as indices into the sigmas, ``init_noise_sigma``,
    ``add_noise``, img2img's ``strength_timesteps``)."""

    order = 1

    def __init__(self, sampler: Sampler, schedule: str, base_config: dict[str, Any], settings: SamplerSettings,
                 seeds: Sequence[int], align_your_steps: Sequence[float] = ()):
        self.sampling, external = k_diffusion()
        self.sampler, self.schedule, self.settings, self.seeds = sampler, schedule, settings, list(seeds)
        self.function = A1111_FUNCTIONS.get(sampler.k_function) or getattr(self.sampling, sampler.k_function)
        alphas_cumprod = sampling_alphas_cumprod(base_config, settings)
        v = base_config.get("prediction_type") == "v_prediction"
        wrapper = external.DiscreteVDDPMDenoiser if v else external.DiscreteEpsDDPMDenoiser
        self.denoiser = wrapper(None, alphas_cumprod, quantize=False)  # the model is the loop's, set per pass
        self.align_your_steps = tuple(align_your_steps) or ALIGN_YOUR_STEPS["sd"]
        self.sigmas = self.timesteps = None
        self.begin = 0
        self.nv_noise: NvStepNoise | None = None  # the step noise when the request's source is NV

    def _range(self) -> tuple[float, float]:
        """The sigma range A1111 hands its schedule functions: the model's (or 0.1 to 10, its old Karras range),
        unless the sigma_min / sigma_max options name another."""
        model, settings = self.denoiser, self.settings
        model_range = model.sigma_min.item(), model.sigma_max.item()
        low, high = (0.1, 10.0) if settings.use_old_karras_scheduler_sigmas else model_range
        if settings.sigma_min and settings.sigma_min != model_range[0]:
            low = settings.sigma_min
        if settings.sigma_max and settings.sigma_max != model_range[1]:
            high = settings.sigma_max
        return low, high

    def _rho(self) -> float:
        default = DEFAULT_RHO[self.schedule]
        return self.settings.rho if self.settings.rho and self.settings.rho != default else default

    def _sigmas(self, n: int) -> torch.Tensor:
        sampling, model = self.sampling, self.denoiser
        low, high = self._range()
        if self.schedule == "Karras":
            return sampling.get_sigmas_karras(n, low, high, rho=self._rho())
        if self.schedule == "Exponential":
            return sampling.get_sigmas_exponential(n, low, high)
        if self.schedule == "Polyexponential":
            return sampling.get_sigmas_polyexponential(n, low, high, rho=self._rho())
        if self.schedule in ("SGM Uniform", "Normal") and (self.schedule == "SGM Uniform" or self.ranged):
            # A1111's: timesteps evenly spaced between the range's (SGM Uniform: n + 1 of them, the last dropped)
            ends = model.sigma_to_t(torch.tensor(high)), model.sigma_to_t(torch.tensor(low))
            t = torch.linspace(*ends, n + 1)[:-1] if self.schedule == "SGM Uniform" else torch.linspace(*ends, n)
            return sampling.append_zero(model.t_to_sigma(t))
        if self.schedule == "KL Optimal" and self.ranged:  # evenly spaced in arctan(sigma), as schedules' own
            frac = torch.arange(n + 1, dtype=torch.float64) / n
            return torch.tan(frac * math.atan(low) + (1 - frac) * math.atan(high)).float()
        training = model.sigmas.double().numpy()
        if self.schedule == "Beta":
            settings = self.settings
            return torch.from_numpy(_beta(n, low, high, settings.beta_dist_alpha, settings.beta_dist_beta)).float()
        if self.schedule in SIGMA_SCHEDULES:
            return torch.from_numpy(SIGMA_SCHEDULES[self.schedule](n, training, self.align_your_steps)).float()
        return model.get_sigmas(n)  # Automatic (for samplers without one of their own) and Uniform

    def nearest_timestep(self, t: float) -> int:
        """The training timestep whose sigma is nearest the fractional timestep ``t``'s (A1111's apply_refiner)."""
        sigma = self.denoiser.t_to_sigma(torch.tensor(t, dtype=torch.float32))
        return int(torch.argmin(torch.abs(self.denoiser.sigmas - sigma)))

    @property
    def ranged(self) -> bool:
        """Whether the request moved the schedule's sigma range off the model's."""
        return self._range() != (self.denoiser.sigma_min.item(), self.denoiser.sigma_max.item())

    def set_timesteps(self, steps: int, device: torch.device | None = None) -> None:
        discard = self.sampler.k_options.get("discard_penultimate", False) or \
            self.settings.always_discard_next_to_last_sigma
        sigmas = self._sigmas(steps + 1 if discard else steps)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        self.sigmas = sigmas.to(device or "cpu", torch.float32)
        self.timesteps = torch.arange(len(sigmas) - 1, device=self.sigmas.device)
        self.begin = 0

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        return self.sigmas[self.begin]

    @property
    def txt2img_noise_scale(self) -> torch.Tensor:
        """What txt2img's noise is multiplied by: the first sigma, or with A1111's SGM noise multiplier
        sqrt(1 + sigma^2), as SGM's (SDXL's reference code's) samplers start."""
        sigma = self.sigmas[0]
        return torch.sqrt(1.0 + sigma ** 2.0) if self.settings.sgm_noise_multiplier else sigma

    def extra_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """A1111's extra noise for img2img and the hires pass, added to the noised picture: the same noise again,
        times the option (k-diffusion's latents are in sigma units)."""
        return noise * self.settings.img2img_extra_noise

    @property
    def launch_steps(self) -> int:
        """The step count A1111's CFG denoiser divides its calls by (skip_early_cond): the steps the pass runs,
        twice for its second-order samplers."""
        steps = len(self.sigmas) - 1 - self.begin
        return steps * 2 if self.sampler.k_function in SECOND_ORDER else steps

    @property
    def num_inference_steps(self) -> int:
        return len(self.sigmas) - 1

    def strength_timesteps(self, steps: int, strength: float, device: torch.device | None = None,
                           second_pass: bool = False) -> torch.Tensor:
        """img2img's steps as A1111 counts them: of ``steps``, the last int(strength * steps) + 1; a hires pass
        (A1111 gives it its step count) runs all ``steps`` of a schedule stretched to steps / strength."""
        strength = min(strength, 0.999)
        if second_pass and strength > 0:
            total, run = int(steps / strength), steps - 1
        else:
            total, run = steps, int(strength * steps)
        self.set_timesteps(total, device)
        self.begin = total - run - 1
        return self.timesteps[self.begin:]

    def noise_like(self, generators: Sequence[torch.Generator]):
        """While sampling: k-diffusion's own ``torch.randn_like`` calls (sigma churn) draw from the images'
        generators (or their NV numbers), in this thread only."""
        return ThreadNoise(self.nv_noise or image_noise(generators))

    def add_noise(self, init: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return init + noise * self.sigmas[int(timesteps.reshape(-1)[0])]

    def noise_sampler(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> Callable:
        """The step noise A1111 gives the function: a Brownian tree per image seeded by its seed (the SDE
        samplers, batch-size independent), else each image's generator (or its NV numbers)."""
        if self.sampler.k_options.get("brownian"):  # spanning the whole schedule, img2img's too (as A1111)
            sigmas = self.sigmas
            return self.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                          seed=self.seeds)
        draw = self.nv_noise or image_noise(generators)
        return lambda sigma, sigma_next: draw(x)

    def arguments(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> dict[str, Any]:
        """The function's arguments besides the model and x, as A1111 sets them for the pass's sigmas."""
        sigmas = self.sigmas[self.begin:]
        parameters = inspect.signature(self.function).parameters
        arguments = self.settings.k_arguments(self.sampler)
        if "sigma_min" in parameters:  # DPM fast and adaptive take a range: the model's, or img2img's part
            if self.begin == 0:
                low, high = self.denoiser.sigma_min.item(), self.denoiser.sigma_max.item()
            else:  # img2img: the part of the schedule it runs (its final 0 is no level)
                low, high = sigmas[-2].item(), sigmas[0].item()
            arguments.update(sigma_min=low, sigma_max=high)
            if "n" in parameters:
                arguments["n"] = len(sigmas) - 1
        else:
            arguments["sigmas"] = sigmas
        if "noise_sampler" in parameters:
            arguments["noise_sampler"] = self.noise_sampler(x, generators)
        if "solver_type" in self.sampler.k_options:
            arguments["solver_type"] = self.sampler.k_options["solver_type"]
        return arguments
