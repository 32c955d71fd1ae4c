"""A1111's own schedule types: the noise levels (sigmas) each gives for a number of steps.

diffusers computes Karras, Exponential, Beta and the timestep spacings itself (``sdtrt.contract.samplers`` asks it by
config). The schedules here exist only in A1111 (``modules/sd_schedulers.py``); they are lists of numbers, handed
to a diffusers scheduler that takes custom sigmas (``set_timesteps(sigmas=...)``), so the sampler stays diffusers'.

Every function takes the step count and the model's training sigmas (one per training timestep, ascending:
``sqrt((1 - alphas_cumprod) / alphas_cumprod)``) and returns ``steps + 1`` descending sigmas (the last is where
the final step lands: 0, except KL Optimal, which A1111 ends at the smallest training sigma), as float64.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# NVIDIA's published Align Your Steps noise levels for 10 steps (11 levels; A1111 uses them as published, while
# diffusers' AysSchedules replaces the last, 0.029, with 0).
ALIGN_YOUR_STEPS = {
    "sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def _t_to_sigma(t: np.ndarray, training: np.ndarray) -> np.ndarray:
    """k-diffusion's discrete schedule: a fractional timestep's sigma interpolates log-sigma between neighbours."""
    log_sigmas = np.log(training)
    t = np.clip(t, 0, len(training) - 1)
    low = np.floor(t).astype(np.int64)
    high = np.ceil(t).astype(np.int64)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def simple(steps: int, training: np.ndarray, ays: Sequence[float] = ()) -> np.ndarray:
    """Training sigmas taken at even strides from the noisiest end."""
    stride = len(training) / steps
    return np.array([training[-(1 + int(x * stride))] for x in range(steps)] + [0.0])


def normal(steps: int, training: np.ndarray, ays: Sequence[float] = ()) -> np.ndarray:
    """Timesteps evenly spaced from the last training timestep to the first, both included."""
    return np.append(_t_to_sigma(np.linspace(len(training) - 1, 0, steps), training), 0.0)


def ddim(steps: int, training: np.ndarray, ays: Sequence[float] = ()) -> np.ndarray:
    """Every (1000 // steps)-th training sigma from timestep 1 up, as DDIM's "leading" spacing. When the stride
    does not divide the training steps, A1111 keeps the extra level, so 30 steps run 31."""
    stride = max(len(training) // steps, 1)
    return np.append(training[1::stride][::-1], 0.0)


def kl_optimal(steps: int, training: np.ndarray, ays: Sequence[float] = ()) -> np.ndarray:
    """Evenly spaced in arctan(sigma) between the largest and smallest training sigma (no final 0)."""
    frac = np.arange(steps + 1) / steps
    return np.tan(frac * np.arctan(training[0]) + (1.0 - frac) * np.arctan(training[-1]))


def align_your_steps(steps: int, training: np.ndarray, ays: Sequence[float] = ()) -> np.ndarray:
    """NVIDIA's optimised levels for the model family, log-linearly resampled to the step count."""
    levels = np.asarray(ays, dtype=np.float64)
    if steps != len(levels):
        ascending = np.log(levels[::-1])
        levels = np.exp(np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(levels)), ascending))[::-1]
    return np.append(levels, 0.0)


SIGMA_SCHEDULES: dict[str, Callable[[int, np.ndarray, Sequence[float]], np.ndarray]] = {
    "KL Optimal": kl_optimal,
    "Align Your Steps": align_your_steps,
    "Simple": simple,
    "Normal": normal,
    "DDIM": ddim,
}
