"""AUTOMATIC1111 sampler names -> diffusers scheduler classes, in one table.

Every sampler is a diffusers scheduler object built from the checkpoint's own scheduler config
(``ModelSpec.scheduler_config``) plus the overrides below; sdtrt never implements a sampler itself.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from sdtrt.errors import InvalidRequest


@dataclass(frozen=True)
class Sampler:
    name: str  # as AUTOMATIC1111 spells it
    scheduler: str  # diffusers class name
    overrides: dict[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
        Sampler("Euler", "EulerDiscreteScheduler"),
        Sampler("LMS", "LMSDiscreteScheduler"),
        Sampler("LMS Karras", "LMSDiscreteScheduler", _KARRAS),
        Sampler("Heun", "HeunDiscreteScheduler"),
        Sampler("DPM2", "KDPM2DiscreteScheduler"),
        Sampler("DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS),
        Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        Sampler("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _KARRAS),
        Sampler("DPM++ 2M", "DPMSolverMultistepScheduler"),
        Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _KARRAS),
        Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE),
        Sampler("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
        Sampler("DDIM", "DDIMScheduler"),
        Sampler("PLMS", "PNDMScheduler"),
        Sampler("UniPC", "UniPCMultistepScheduler"),
    ]
}

DEFAULT_SAMPLER = "Euler a"


def sampler_names() -> tuple[str, ...]:
    return tuple(SAMPLERS)


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler for one request (schedulers keep per-run state)."""
    try:
        sampler = SAMPLERS[name]
    except KeyError:
        raise InvalidRequest("sampler", name, "one of: " + ", ".join(repr(n) for n in SAMPLERS)) from None
    import diffusers  # heavy: imported on first use so that `sdtrt --help` stays fast

    cls = getattr(diffusers, sampler.scheduler)
    return cls.from_config(base_config, **sampler.overrides)


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
