"""AUTOMATIC1111 sampler names and schedule types -> diffusers scheduler classes, in one table.

Every sampler is a diffusers scheduler object built from the checkpoint's own scheduler config
(``ModelSpec.scheduler_config``) plus the overrides below; sdtrt never implements a sampler itself.
A1111's older combined names ("DPM++ 2M Karras") are the base sampler with a schedule type; newer A1111
sends the schedule type separately ("scheduler": "Karras"), which ``schedule_type`` takes.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Sequence

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.schedules import ALIGN_YOUR_STEPS, SIGMA_SCHEDULES

# The eta sdtrt's samplers run with, as A1111's defaults (options eta_ancestral 1, eta_ddim 0): ancestral and SDE
# samplers add their full noise, DDIM none; the other samplers have no eta (A1111 ignores it for them).
ETA_ANCESTRAL, ETA_DDIM = 1.0, 0.0


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler, every fact about it: its names, the diffusers scheduler and the k-diffusion function
    behind it, its noise."""

    name: str  # as AUTOMATIC1111 spells it
    scheduler: str | None  # diffusers class name; None: diffusers has no faithful one (k-diffusion runs it)
    overrides: dict[str, Any] = field(default_factory=dict)
    schedule: str = "Automatic"  # the schedule type a combined name implies ("Karras" in "DPM++ 2M Karras")
    max_steps: int = 0  # the most steps the sampler can take (0: no limit of its own)
    aliases: tuple[str, ...] = ()  # A1111's other names for it (k-diffusion function names), as /samplers lists
    step_noise: bool = False  # adds fresh noise at every step (drawn from each image's CPU generator)
    eta: float | None = None  # the eta it runs with (A1111's default for it); None: it has none
    k_function: str | None = None  # the k_diffusion.sampling function A1111 runs it with; None: not a k sampler
    k_params: tuple[str, ...] = ()  # the settings A1111 hands that function (its sampler_extra_params), eta aside
    k_options: dict[str, Any] = field(default_factory=dict)  # A1111's options: discard_penultimate, brownian, ...
    t_function: str | None = None  # A1111's own timestep sampler it runs as (sdtrt.pipeline.timesteps); None: none


# A1111 schedule type -> the diffusers config that gives it. A1111 (k-diffusion) spans Karras, Exponential and Beta
# over the model's whole sigma range; diffusers' Euler-family classes take the range from the sigmas at their
# spaced timesteps, which with SD's "leading" spacing starts at 11.0 instead of 14.6: "linspace" spacing includes
# both ends, so these are A1111's sigmas (checked against A1111's formulas in tests/test_a1111_samplers.py).
# Polyexponential is k-diffusion's polyexponential at A1111's default rho of 1, which is the exponential schedule.
# Uniform is A1111's evenly spaced timesteps; SGM Uniform is diffusers' "trailing" equivalent (integer timesteps
# where A1111 interpolates: at most one training timestep apart). A1111's own schedules (sdtrt.contract.schedules) are
# sigma lists instead, for samplers whose diffusers class takes custom sigmas.
_FULL_RANGE = {"timestep_spacing": "linspace"}
CONFIG_SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},
    "Uniform": {"timestep_spacing": "linspace"},
    "Karras": {"use_karras_sigmas": True, **_FULL_RANGE},
    "Exponential": {"use_exponential_sigmas": True, **_FULL_RANGE},
    "Polyexponential": {"use_exponential_sigmas": True, **_FULL_RANGE},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Beta": {"use_beta_sigmas": True, **_FULL_RANGE},
}
# Every schedule type, in A1111's order.
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                                   "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
assert set(SCHEDULE_TYPES) == set(CONFIG_SCHEDULES) | set(SIGMA_SCHEDULES)
DEFAULT_SCHEDULE = "Automatic"
# A1111's own timestep samplers take no schedule type: they run on its timesteps (A1111 ignores the setting).
TIMESTEP_SCHEDULES = (DEFAULT_SCHEDULE,)
# The rho of the schedules that have one, as A1111's /schedulers reports (k-diffusion's defaults).
DEFAULT_RHO = {"Karras": 7.0, "Polyexponential": 1.0}


def schedule_detail(name: str) -> str:
    """How a schedule type is obtained, for `sdtrt samplers`."""
    if name in SIGMA_SCHEDULES:
        return "A1111's sigma list, given to diffusers as custom sigmas"
    return " ".join(f"{k}={v}" for k, v in CONFIG_SCHEDULES[name].items()) or "the sampler's default"


_SDE = {"algorithm_type": "sde-dpmsolver++"}


def _with_karras(name: str, scheduler: str | None, overrides: dict[str, Any] | None = None,
                 aliases: tuple[str, ...] = (), **facts: Any) -> list[Sampler]:
    """The sampler and A1111's older combined name for it on the Karras schedule (which has no aliases)."""
    overrides = overrides or {}
    return [Sampler(name, scheduler, overrides, aliases=aliases, **facts),
            Sampler(f"{name} Karras", scheduler, overrides, "Karras", **facts)]


_ANCESTRAL = {"step_noise": True, "eta": ETA_ANCESTRAL}  # ancestral and SDE samplers
# What A1111 (1.10) hands each k-diffusion function besides eta (sd_samplers_kdiffusion.sampler_extra_params).
_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_NOISE = ("s_noise",)
_DISCARD = {"discard_penultimate": True}  # A1111 runs one step more and drops the next-to-last sigma
_BROWNIAN = {"brownian": True}  # step noise from a Brownian tree seeded per image (batch-size independent)


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral"),
                k_function="sample_euler_ancestral", **_ANCESTRAL),
        Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",), k_function="sample_euler", k_params=_CHURN),
        *_with_karras("LMS", "LMSDiscreteScheduler", aliases=("k_lms",), k_function="sample_lms"),
        Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",), k_function="sample_heun", k_params=_CHURN),
        *_with_karras("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",), k_function="sample_dpm_2",
                      k_params=_CHURN, k_options=_DISCARD),
        *_with_karras("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",),
                      k_function="sample_dpm_2_ancestral", k_params=_NOISE, k_options=_DISCARD, **_ANCESTRAL),
        # diffusers has no ancestral single-step DPM-Solver++ (its DPMSolverSinglestepScheduler adds no noise)
        *_with_karras("DPM++ 2S a", None, aliases=("k_dpmpp_2s_a",), k_function="sample_dpmpp_2s_ancestral",
                      k_params=_NOISE, **_ANCESTRAL),
        *_with_karras("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m",),
                      k_function="sample_dpmpp_2m"),
        *_with_karras("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE, aliases=("k_dpmpp_2m_sde",),
                      k_function="sample_dpmpp_2m_sde", k_params=_NOISE, k_options=_BROWNIAN, **_ANCESTRAL),
        # k-diffusion's 2M SDE with solver_type='heun' is diffusers' SDE-DPM-Solver++ with its Heun correction
        *_with_karras("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", {**_SDE, "solver_type": "heun"},
                      aliases=("k_dpmpp_2m_sde_heun",), k_function="sample_dpmpp_2m_sde", k_params=_NOISE,
                      k_options={**_BROWNIAN, "solver_type": "heun"}, **_ANCESTRAL),
        # diffusers' third-order SDE-DPM-Solver++ step differs from k-diffusion's in its second-derivative term
        *_with_karras("DPM++ 3M SDE", None, aliases=("k_dpmpp_3m_sde",), k_function="sample_dpmpp_3m_sde",
                      k_params=_NOISE, k_options={**_BROWNIAN, **_DISCARD}, **_ANCESTRAL),
        *_with_karras("DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde",), k_function="sample_dpmpp_sde",
                      k_params=_NOISE, k_options=_BROWNIAN, **_ANCESTRAL),
        # k-diffusion's DPM-Solver with steps evenly spaced in log-SNR, and its adaptive-step one (which ignores
        # the step count): no diffusers counterpart. A1111 hands both its ancestral eta.
        Sampler("DPM fast", None, aliases=("k_dpm_fast",), k_function="sample_dpm_fast", k_params=_NOISE,
                **_ANCESTRAL),
        Sampler("DPM adaptive", None, aliases=("k_dpm_ad",), k_function="sample_dpm_adaptive", k_params=_NOISE,
                **_ANCESTRAL),
        # Restart sampling is A1111's own function (sdtrt.pipeline.ksampling.sample_restart); A1111 hands it no
        # setting (its s_noise stays 1) and adds its restarts' noise from each image's generator.
        Sampler("Restart", None, aliases=("restart",), k_function="sample_restart", step_noise=True,
                k_options={"own_function": True}),
        # As A1111 runs them whatever the checkpoint's scheduler config says (SD 1.x/2.x ship these; SDXL ships an
        # EulerDiscrete config without them): DDIM without clipping, PLMS without Runge-Kutta warm-up steps. A1111's
        # own timestep functions run them in the A1111-exact mode (its timesteps differ from diffusers' spacing).
        Sampler("DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}, aliases=("ddim",),
                eta=ETA_DDIM, t_function="ddim"),
        # DDIM with CFG++ (Chung et al. 2024): the guided prediction's x0, re-noised along the unconditional
        # prediction, at A1111's CFG scale / 12.5. A1111's own function, in no library.
        Sampler("DDIM CFG++", None, aliases=("ddim_cfgpp",), eta=ETA_DDIM, t_function="ddim_cfgpp"),
        Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms",), t_function="plms"),
        # A1111 runs UniPC with its own copy of the UniPC authors' code on continuous time (fractional timesteps):
        # diffusers' update on A1111's time grid in the A1111-exact mode (sdtrt.pipeline.timesteps.sample_unipc)
        Sampler("UniPC", "UniPCMultistepScheduler", aliases=("unipc",), t_function="unipc"),
        # The LCM authors' scheduler (for LCM-distilled models and LCM LoRAs). It spreads the steps over LCM's 50
        # original timesteps as diffusers does (A1111 spaces them evenly in its own way). Its re-noising between
        # steps is step noise; it has no eta.
        Sampler("LCM", "LCMScheduler", max_steps=50, aliases=("k_lcm",), step_noise=True),  # its steps are picked from LCM's 50 original ones
    ]
}

DEFAULT_SAMPLER = "Euler a"
# What A1111 (1.9+) runs for "Automatic": its table gives these samplers a schedule of their own; the others
# follow the checkpoint's scheduler config (diffusers' default).
AUTOMATIC_SCHEDULES = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM2": "Karras", "DPM2 a": "Karras",
                       "DPM++ 2S a": "Karras", "DPM++ 2M SDE": "Exponential", "DPM++ 2M SDE Heun": "Exponential",
                       "DPM++ 3M SDE": "Exponential", "Restart": "Karras"}
def draws_step_noise(name: str) -> bool:
    return SAMPLERS[name].step_noise


def sampler_names() -> tuple[str, ...]:
    return tuple(SAMPLERS)


_IMPORT_LOCK = threading.Lock()


def diffusers_class(name: str):
    # diffusers is heavy: imported on first use so that `sdtrt --help` stays fast. Its lazy module is not safe
    # to import from two threads at once (one sees a half-built module), hence the lock.
    with _IMPORT_LOCK:
        # diffusers only where a scheduler is made: the contract loads in a client-only install, which has none
        import diffusers

        return getattr(diffusers, name)


def _scheduler_class(sampler: Sampler):
    return diffusers_class(sampler.scheduler)


@lru_cache(maxsize=None)
def _reads_spacing(class_name: str) -> bool:
    """Whether the class spaces its steps by ``timestep_spacing``: every class takes the setting, LCM's ignores it."""
    spaced = []
    for spacing in ("linspace", "trailing"):
        scheduler = diffusers_class(class_name).from_config({"timestep_spacing": spacing})
        scheduler.set_timesteps(10)
        spaced.append(scheduler.timesteps)
    return bool((spaced[0] != spaced[1]).any())


def _follows(name: str, schedule: str, base_config: dict[str, Any]) -> bool:
    cls = _scheduler_class(SAMPLERS[name])
    if schedule in CONFIG_SCHEDULES:
        params = inspect.signature(cls.__init__).parameters
        if not all(k in params for k in CONFIG_SCHEDULES[schedule]):
            return False
        if CONFIG_SCHEDULES[schedule].get("timestep_spacing") and len(CONFIG_SCHEDULES[schedule]) == 1:
            return _reads_spacing(SAMPLERS[name].scheduler)
        return True
    if "sigmas" not in inspect.signature(cls.set_timesteps).parameters:
        return False
    try:  # some classes take custom sigmas only in another mode (UniPC: flow-matching models)
        set_timesteps(make_scheduler(name, base_config, schedule, {name: [schedule]}), 10)
    except (ValueError, TypeError, NotImplementedError):
        return False
    return True


def supported_schedules(name: str, base_config: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The schedule types this sampler's diffusers class can follow: it takes the config setting, or custom
    sigmas for A1111's own schedules (every one for a sampler only k-diffusion runs: a sigma list is all its
    function takes). Needs diffusers: export computes it once into the spec (``ModelSpec.schedules``), which
    everyone else reads. Where the diffusers class cannot follow a schedule, k-diffusion runs the sampler
    (``runs_on_k_diffusion``), so every schedule type works with every k-diffusion sampler."""
    if SAMPLERS[name].scheduler is None:
        return SCHEDULE_TYPES if SAMPLERS[name].k_function else TIMESTEP_SCHEDULES
    return tuple(t for t in SCHEDULE_TYPES if _follows(name, t, base_config or {}))


@dataclass(frozen=True)
class UniPcOptions:
    """A1111's UniPC options (uni_pc_variant, uni_pc_skip_type, uni_pc_order, uni_pc_lower_order_final), its
    defaults; its third variant, vary_coeff, is not diffusers' and not served."""

    variant: str = "bh1"
    skip_type: str = "time_uniform"
    order: int = 3
    lower_order_final: bool = True


UNIPC_VARIANTS = ("bh1", "bh2")
UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")
UNIPC_MAX_ORDER = 6  # (A1111's slider goes to 50; beyond a few orders the solve is ill-conditioned)


@dataclass(frozen=True)
class SamplerSettings:
    """A request's settings for its sampler, as A1111 takes them: ``eta`` (< 0: the sampler's own default, A1111's
    eta_ancestral 1 or eta_ddim 0), sigma churn and its range (``s_tmax`` 0: no upper bound), the noise multiplier,
    and ENSD (the step noise drawn from seed + delta). ``k_diffusion``: run k-diffusion's function even where
    diffusers has the sampler. ``randn_source``: where the step noise comes from, as the starting noise (NV: an
    NVIDIA GPU's numbers, which only the k-diffusion path draws)."""

    eta: float = -1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    s_noise: float = 1.0
    s_min_uncond: float = 0.0
    skip_early_cond: float = 0.0
    eta_noise_seed_delta: int = 0
    k_diffusion: bool = False
    randn_source: str = "CPU"
    # A1111's schedule options (its k-diffusion sampler's get_sigmas; 0: the model's range, the schedule's rho)
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    beta_dist_alpha: float = 0.6
    beta_dist_beta: float = 0.6
    use_old_karras_scheduler_sigmas: bool = False
    always_discard_next_to_last_sigma: bool = False
    sgm_noise_multiplier: bool = False
    # A1111's noise levels (apply_alpha_schedule_override) and img2img's extra noise (its samplers' img2img)
    sd_noise_schedule: str = "Default"
    use_downcasted_alpha_bar: bool = False
    img2img_extra_noise: float = 0.0
    # A1111's UniPC options (its own timestep UniPC: UniPcOptions)
    unipc_variant: str = UniPcOptions.variant
    unipc_skip_type: str = UniPcOptions.skip_type
    unipc_order: int = UniPcOptions.order
    unipc_lower_order_final: bool = UniPcOptions.lower_order_final

    @property
    def unipc(self) -> UniPcOptions:
        return UniPcOptions(self.unipc_variant, self.unipc_skip_type, self.unipc_order, self.unipc_lower_order_final)

    @classmethod
    def of(cls, request: Any) -> "SamplerSettings":
        """A request's settings for its sampler (the request fields of these names)."""
        return cls(**{f.name: getattr(request, f.name) for f in dataclasses.fields(cls)})

    def a1111_only(self, schedule: str, timesteps: bool = False) -> tuple[str, ...]:
        """The settings, at other than A1111's defaults, that only A1111's code paths take: k-diffusion's
        schedule options (the Beta ones with that schedule), or with ``timesteps`` those A1111's own timestep
        samplers read (its noise levels, the extra step, extra noise; they ignore the sigma options)."""
        names = TIMESTEP_OPTIONS if timesteps else SCHEDULE_OPTIONS + TIMESTEP_OPTIONS
        if schedule != "Beta":
            names = tuple(name for name in names if not name.startswith("beta_dist_"))
        return tuple(name for name in names if getattr(self, name) != getattr(_DEFAULT_SETTINGS, name))

    def eta_for(self, sampler: Sampler) -> float:
        return (sampler.eta or 0.0) if self.eta < 0 else self.eta

    def k_arguments(self, sampler: Sampler) -> dict[str, Any]:
        """The keyword arguments A1111 hands the sampler's k-diffusion function (eta where it takes one)."""
        values = {"s_churn": self.s_churn, "s_tmin": self.s_tmin, "s_tmax": self.s_tmax or float("inf"),
                  "s_noise": self.s_noise}
        arguments = {name: values[name] for name in sampler.k_params}
        if sampler.eta is not None:
            arguments["eta"] = self.eta_for(sampler)
        return arguments


_DEFAULT_SETTINGS = SamplerSettings()
SCHEDULE_OPTIONS = ("sigma_min", "sigma_max", "rho", "beta_dist_alpha", "beta_dist_beta",
                    "use_old_karras_scheduler_sigmas", "sgm_noise_multiplier")
TIMESTEP_OPTIONS = ("sd_noise_schedule", "use_downcasted_alpha_bar", "always_discard_next_to_last_sigma",
                    "img2img_extra_noise")
NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")  # A1111's sd_noise_schedule


def _diffusers_honours(sampler: Sampler, settings: SamplerSettings) -> bool:
    """Whether the diffusers class draws what A1111 does with these settings: only at the defaults of the
    settings A1111 hands the sampler's function (the others change nothing in A1111 either), and without
    A1111's uncond skipping, which is k-diffusion's denoiser's."""
    return (settings.k_arguments(sampler) == SamplerSettings().k_arguments(sampler) and settings.s_min_uncond == 0
            and settings.skip_early_cond == 0)


def runs_on_k_diffusion(name: str, schedule: str, schedules: dict[str, list[str]],
                        settings: SamplerSettings = SamplerSettings()) -> bool:
    """Whether a request's sampler runs on k-diffusion's function (as A1111 runs it) rather than its diffusers
    class: when diffusers has none, when asked, when the diffusers class cannot follow the schedule type, when
    a setting A1111 honours for it is one the diffusers class does not take, or when its step noise is NV's
    (diffusers draws step noise from torch's generators)."""
    sampler = SAMPLERS[name]
    if sampler.k_function is None:
        return False
    if sampler.scheduler is None or settings.k_diffusion or (settings.randn_source == "NV" and sampler.step_noise):
        return True
    return (schedule not in schedules.get(name, ()) or not _diffusers_honours(sampler, settings)
            or bool(settings.a1111_only(schedule)))


def runs_on_a1111_timesteps(name: str, schedule: str, settings: SamplerSettings = SamplerSettings()) -> bool:
    """Whether a request's sampler runs as A1111's own timestep function (DDIM, DDIM CFG++, PLMS on A1111's
    timesteps and CFG): when no library has it, and on the "Automatic" schedule when asked (A1111-exact), with NGMS
    (A1111 skips the uncond by timestep) or with an eta whose noise is NV's (diffusers draws torch's)."""
    sampler = SAMPLERS[name]
    if sampler.t_function is None:
        return False
    if sampler.scheduler is None:
        return True
    nv_noise = settings.randn_source == "NV" and settings.eta_for(sampler) > 0
    skips = settings.s_min_uncond > 0 or settings.skip_early_cond > 0
    levels = bool(settings.a1111_only(schedule, timesteps=True))
    unipc = sampler.t_function == "unipc" and settings.unipc != UniPcOptions()  # (A1111's own UniPC takes them)
    return schedule == DEFAULT_SCHEDULE and (settings.k_diffusion or skips or nv_noise or levels or unipc)


def schedule_table(base_config: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Sampler -> the schedule types it accepts, for the spec (``base_config``: the checkpoint's scheduler)."""
    return {name: list(supported_schedules(name, base_config)) for name in SAMPLERS}


def resolve(name: str, schedule_type: str, schedules: dict[str, list[str]]) -> tuple[Sampler, str]:
    """(sampler, effective schedule type) checked against ``schedules`` (the spec's table, for the samplers only
    diffusers runs; a k-diffusion sampler takes every schedule type, as its function takes any sigma list); an
    explicit schedule type wins over a combined name's."""
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
    allowed = SCHEDULE_TYPES if sampler.k_function else schedules.get(name, ())
    if effective not in allowed:
        raise InvalidRequest("schedule_type", schedule_type,
                             f"one of: {', '.join(repr(t) for t in allowed)} with sampler {name!r}")
    return sampler, effective


def make_scheduler(
    name: str, base_config: dict[str, Any], schedule_type: str, schedules: dict[str, list[str]],
    seeds: list[int] | None = None, align_your_steps: Sequence[float] = (),
) -> Any:
    """A fresh diffusers scheduler for one request (schedulers keep per-run state); set its steps with
    ``set_timesteps`` below, which knows A1111's own schedules.

    ``seeds`` (one per image) seed DPM++ SDE's Brownian tree, one tree per image, as A1111 does; the other
    samplers draw their noise from the per-image generators passed to ``step`` instead. ``align_your_steps``:
    the model family's Align Your Steps levels (the spec's).
    """
    sampler, effective = resolve(name, schedule_type, schedules)
    if sampler.scheduler is None:
        raise ValueError(f"{name!r} has no diffusers scheduler: k-diffusion runs it (sdtrt.pipeline.ksampling)")
    cls = _scheduler_class(sampler)
    overrides = {**sampler.overrides, **CONFIG_SCHEDULES.get(effective, {})}
    if seeds is not None and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        overrides["noise_sampler_seed"] = list(seeds)
    scheduler = cls.from_config(base_config, **overrides)
    if effective in SIGMA_SCHEDULES:
        levels = tuple(align_your_steps) or ALIGN_YOUR_STEPS["sd"]
        scheduler.a1111_sigmas = partial(SIGMA_SCHEDULES[effective], ays=levels)
    return scheduler


def set_timesteps(scheduler: Any, steps: int, device: Any = None) -> None:
    """diffusers' ``set_timesteps``; for A1111's own schedules, with the sigma list they give for ``steps`` (the
    model's training sigmas come from the scheduler's own betas)."""
    sigmas = getattr(scheduler, "a1111_sigmas", None)
    if sigmas is None:
        scheduler.set_timesteps(steps, device=device)
        return
    cumprod = scheduler.alphas_cumprod.double().cpu().numpy()
    scheduler.set_timesteps(device=device, sigmas=sigmas(steps, ((1 - cumprod) / cumprod) ** 0.5).tolist())


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
