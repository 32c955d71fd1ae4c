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

import importlib
import importlib.util
import inspect
import sys
import threading
import types
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sdtrt.contract.errors import UsageError
from sdtrt.contract.philox import nv_randn
from sdtrt.contract.samplers import Sampler, SamplerSettings, diffusers_class
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


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """Empty modules for ``from torchvision.transforms import functional`` (k_diffusion.utils' image helpers)."""
    if "torchvision" in sys.modules:
        return {}
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    return {"torchvision": package, "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional}


def k_diffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """k-diffusion's ``sampling`` and ``external`` modules, loaded once, without the package's ``__init__``."""
    with _LOCK:
        if "k_diffusion.external" in sys.modules:
            return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise UsageError(f"k-diffusion is not installed: scripts/setup.sh installs it (pip install --no-deps "
                             f"{K_DIFFUSION} torchdiffeq)")
        sys.modules.setdefault("k_diffusion", importlib.util.module_from_spec(spec))  # a package, not executed
        stand_ins = _torchvision_stand_in()
        sys.modules.update(stand_ins)
        try:
            sampling = importlib.import_module("k_diffusion.sampling")
            external = importlib.import_module("k_diffusion.external")
        finally:
            for name in stand_ins:
                sys.modules.pop(name, None)
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


def _beta(steps: int, training: np.ndarray, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """A1111's Beta schedule (its options' default alpha and beta, 0.6): the beta distribution's quantiles of
    evenly spaced points, mapped linearly between the smallest and largest training sigma (``training``
    ascending)."""
    from scipy import stats  # scipy only for this schedule (k-diffusion's sampling imports it anyway)

    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, steps), alpha, beta)
    return np.append(training[0] + quantiles * (training[-1] - training[0]), 0.0)


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
        DDPMScheduler = diffusers_class("DDPMScheduler")  # the checkpoint's training noise levels (its config)

        self.sampling, external = k_diffusion()
        self.sampler, self.schedule, self.settings, self.seeds = sampler, schedule, settings, list(seeds)
        self.function = A1111_FUNCTIONS.get(sampler.k_function) or getattr(self.sampling, sampler.k_function)
        alphas_cumprod = DDPMScheduler.from_config(base_config).alphas_cumprod.float()
        v = base_config.get("prediction_type") == "v_prediction"
        wrapper = external.DiscreteVDDPMDenoiser if v else external.DiscreteEpsDDPMDenoiser
        self.denoiser = wrapper(None, alphas_cumprod, quantize=False)  # the model is the loop's, set per pass
        self.align_your_steps = tuple(align_your_steps) or ALIGN_YOUR_STEPS["sd"]
        self.sigmas = self.timesteps = None
        self.begin = 0
        self.nv_noise: NvStepNoise | None = None  # the step noise when the request's source is NV

    def _sigmas(self, n: int) -> torch.Tensor:
        sampling, model = self.sampling, self.denoiser
        low, high = model.sigma_min.item(), model.sigma_max.item()
        if self.schedule == "Karras":
            return sampling.get_sigmas_karras(n, low, high)
        if self.schedule == "Exponential":
            return sampling.get_sigmas_exponential(n, low, high)
        if self.schedule == "Polyexponential":
            return sampling.get_sigmas_polyexponential(n, low, high, rho=1.0)
        if self.schedule == "SGM Uniform":  # A1111's: n + 1 evenly spaced timesteps, the last dropped
            t = torch.linspace(model.sigma_to_t(torch.tensor(high)), model.sigma_to_t(torch.tensor(low)), n + 1)[:-1]
            return sampling.append_zero(model.t_to_sigma(t))
        training = model.sigmas.double().numpy()
        if self.schedule == "Beta":
            return torch.from_numpy(_beta(n, training)).float()
        if self.schedule in SIGMA_SCHEDULES:
            return torch.from_numpy(SIGMA_SCHEDULES[self.schedule](n, training, self.align_your_steps)).float()
        return model.get_sigmas(n)  # Automatic (for samplers without one of their own) and Uniform

    def set_timesteps(self, steps: int, device: torch.device | None = None) -> None:
        discard = self.sampler.k_options.get("discard_penultimate", False)
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
