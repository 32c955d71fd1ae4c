"""AUTOMATIC1111 sampler names and schedule types -> diffusers scheduler classes, in one table.

Every sampler is a diffusers scheduler object built from the checkpoint's own scheduler config
(``ModelSpec.scheduler_config``) plus the overrides below; sdtrt never implements a sampler itself.
A1111's older combined names ("DPM++ 2M Karras") are the base sampler with a schedule type; newer A1111
sends the schedule type separately ("scheduler": "Karras"), which ``schedule_type`` takes.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

from sdtrt.errors import InvalidRequest


@dataclass(frozen=True)
class Sampler:
    name: str  # as AUTOMATIC1111 spells it
    scheduler: str  # diffusers class name
    overrides: dict[str, Any] = field(default_factory=dict)
    schedule: str = "Automatic"  # the schedule type a combined name implies ("Karras" in "DPM++ 2M Karras")


# A1111 schedule type -> the diffusers config that gives it (diffusers' "A1111 / k-diffusion" equivalents).
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
DEFAULT_SCHEDULE = "Automatic"

_SDE = {"algorithm_type": "sde-dpmsolver++"}


def _with_karras(name: str, scheduler: str, overrides: dict[str, Any] | None = None) -> list[Sampler]:
    overrides = overrides or {}
    return [Sampler(name, scheduler, overrides), Sampler(f"{name} Karras", scheduler, overrides, "Karras")]


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
        Sampler("Euler", "EulerDiscreteScheduler"),
        *_with_karras("LMS", "LMSDiscreteScheduler"),
        Sampler("Heun", "HeunDiscreteScheduler"),
        *_with_karras("DPM2", "KDPM2DiscreteScheduler"),
        *_with_karras("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        *_with_karras("DPM++ 2M", "DPMSolverMultistepScheduler"),
        *_with_karras("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE),
        *_with_karras("DPM++ SDE", "DPMSolverSDEScheduler"),
        # As A1111 runs them whatever the checkpoint's scheduler config says (SD 1.x/2.x ship these; SDXL ships an
        # EulerDiscrete config without them): DDIM without clipping, PLMS without Runge-Kutta warm-up steps.
        Sampler("DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
        Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
        Sampler("UniPC", "UniPCMultistepScheduler"),
    ]
}

DEFAULT_SAMPLER = "Euler a"
# What A1111 (1.9+) runs for "Automatic": its table gives these samplers a schedule of their own; the others
# follow the checkpoint's scheduler config (diffusers' default).
AUTOMATIC_SCHEDULES = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM2": "Karras", "DPM++ 2M SDE": "Exponential"}
# Samplers that add fresh noise at every step (ancestral, SDE): diffusers draws it from each image's CPU generator.
STEP_NOISE = frozenset(name for name, s in SAMPLERS.items() if " a" in f" {name} " or "SDE" in name)


def draws_step_noise(name: str) -> bool:
    return name in STEP_NOISE


def sampler_names() -> tuple[str, ...]:
    return tuple(SAMPLERS)


_IMPORT_LOCK = threading.Lock()


def _scheduler_class(sampler: Sampler):
    # diffusers is heavy: imported on first use so that `sdtrt --help` stays fast. Its lazy module is not safe
    # to import from two threads at once (one sees a half-built module), hence the lock.
    with _IMPORT_LOCK:
        import diffusers

        return getattr(diffusers, sampler.scheduler)


def supported_schedules(name: str) -> tuple[str, ...]:
    """The schedule types this sampler's diffusers class can follow (its __init__ takes the setting). Needs
    diffusers: export computes it once into the spec (``ModelSpec.schedules``), which everyone else reads."""
    params = inspect.signature(_scheduler_class(SAMPLERS[name]).__init__).parameters
    return tuple(t for t, config in SCHEDULE_TYPES.items() if all(k in params for k in config))


def schedule_table() -> dict[str, list[str]]:
    """Sampler -> the schedule types it accepts, for the spec."""
    return {name: list(supported_schedules(name)) for name in SAMPLERS}


def resolve(name: str, schedule_type: str, schedules: dict[str, list[str]]) -> tuple[Sampler, str]:
    """(sampler, effective schedule type) checked against ``schedules`` (the spec's table); an explicit schedule
    type wins over a combined name's."""
    try:
        sampler = SAMPLERS[name]
    except KeyError:
        raise InvalidRequest("sampler", name, "one of: " + ", ".join(repr(n) for n in SAMPLERS)) from None
    if schedule_type not in SCHEDULE_TYPES:
        raise InvalidRequest("schedule_type", schedule_type, "one of: " + ", ".join(repr(t) for t in SCHEDULE_TYPES))
    if schedule_type != DEFAULT_SCHEDULE:
        effective = schedule_type
    elif sampler.schedule != DEFAULT_SCHEDULE:  # a combined name ("DPM++ 2M Karras") says it
        effective = sampler.schedule
    else:
        effective = AUTOMATIC_SCHEDULES.get(name, DEFAULT_SCHEDULE)
    allowed = schedules.get(name, ())
    if effective not in allowed:
        raise InvalidRequest("schedule_type", schedule_type,
                             f"one of: {', '.join(repr(t) for t in allowed)} with sampler {name!r}")
    return sampler, effective


def make_scheduler(
    name: str, base_config: dict[str, Any], schedule_type: str, schedules: dict[str, list[str]],
    seeds: list[int] | None = None,
) -> Any:
    """A fresh diffusers scheduler for one request (schedulers keep per-run state).

    ``seeds`` (one per image) seed DPM++ SDE's Brownian tree, one tree per image, as A1111 does; the other
    samplers draw their noise from the per-image generators passed to ``step`` instead.
    """
    sampler, effective = resolve(name, schedule_type, schedules)
    cls = _scheduler_class(sampler)
    overrides = {**sampler.overrides, **SCHEDULE_TYPES[effective]}
    if seeds is not None and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        overrides["noise_sampler_seed"] = list(seeds)
    return cls.from_config(base_config, **overrides)


def step_kwargs(scheduler: Any, generators: list[Any], eta: float = 0.0) -> dict[str, Any]:
    """The extra arguments diffusers' pipelines pass to ``scheduler.step``, only where its signature takes them.

    One generator per image: diffusers' ``randn_tensor`` draws image i's step noise from generator i, which is
    what a pipeline called per image with that generator does.
    """
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs
