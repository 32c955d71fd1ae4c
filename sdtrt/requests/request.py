"""The requests (txt2img, img2img) and their validation. Their fields are declared once, in fields.py: the
dataclasses here are made from that table, and export stores the table with each model's limits in the spec;
servers, clients and the CLI check against the spec's copy (sdtrt.requests.plan, which also reads the prompts), so every error names the field and its allowed
range the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.hires import HiresSize, Tiling, hires_size
from sdtrt.contract.samplers import DEFAULT_SCHEDULE, SAMPLERS, SamplerSettings, UniPcOptions, draws_step_noise, resolve
from sdtrt.contract.seeds import resolve_seed
from sdtrt.contract.spec import IMG2IMG, OWN_VAE_NAMES, TXT2IMG, FieldSpec, ModelSpec
from sdtrt.requests.fields import ModelLimits, fields_of, request_table
from sdtrt.requests.hypertile import asks_for_hypertile, check_hypertile


def _request_class(name: str, doc: str, job: str, base: type | None = None) -> type:
    """A frozen dataclass of ``job``'s fields (each None by default: the served model's default), those of
    ``base`` first."""
    inherited = {f.name for f in dataclasses.fields(base)} if base else set()
    own = [(f.name, f.python_type | None, dataclasses.field(default=None))
           for f in fields_of(job) if f.name not in inherited]
    cls = dataclasses.make_dataclass(name, own, bases=(base,) if base else (), frozen=True,
                                     namespace={"__doc__": doc, "__module__": __name__,
                                                "as_dict": lambda self: asdict(self)})
    return cls


Txt2ImgRequest = _request_class("Txt2ImgRequest", """A txt2img job's settings (the fields of sdtrt.requests.fields).
    Any left None takes the served model's default: the defaults, like the limits, exist once, in the spec's
    request table (written at export); ``validate`` fills them in and checks every value.""", TXT2IMG)
Img2ImgRequest = _request_class("Img2ImgRequest", """img2img and inpainting settings; the init image and the mask
    travel beside the request, as arrays.""", IMG2IMG, base=Txt2ImgRequest)


def job_fields(request_type: type) -> tuple[str, ...]:
    """The request fields a job takes, in order (the dataclass's fields; their facts are in the spec)."""
    return tuple(f.name for f in dataclasses.fields(request_type))


def request_fields(
    native_size: int, min_size: int, max_size: int, size_multiple: int, max_batch: int, clip_layers: int = 12,
    max_prompt_chars: int | None = None, **registered: tuple[str, ...],
) -> dict[str, FieldSpec]:
    """The request table for one model (``registered``: ModelLimits' upscalers and face_restorers, the models it
    was exported with); export stores it in the spec."""
    return request_table(ModelLimits(native_size, min_size, max_size, size_multiple, max_batch, clip_layers,
                                     max_prompt_chars, **registered))


def check_value(field: FieldSpec, value: Any) -> Any:
    """Coerce one value to the field's type and check it against the field's limits."""
    if field.dtype == "bool":
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            return bool(value)
        if value in ("True", "False"):  # read back from an infotext, as A1111 writes it
            return value == "True"
        raise InvalidRequest(field.name, value, field.allowed())
    if field.dtype == "string":
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise InvalidRequest(field.name, value, field.allowed())
        if field.choices is not None and value not in field.choices:
            raise InvalidRequest(field.name, value, field.allowed())
        if field.max_length is not None and len(value) > field.max_length:
            raise InvalidRequest(field.name, value, field.allowed())
        return value
    if isinstance(value, str):  # e.g. read back from an infotext
        try:
            value = float(value)
        except ValueError:
            raise InvalidRequest(field.name, value, field.allowed()) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "item"):
        raise InvalidRequest(field.name, value, field.allowed())
    value = value.item() if hasattr(value, "item") else value
    if field.dtype.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise InvalidRequest(field.name, value, field.allowed())
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise InvalidRequest(field.name, value, field.allowed())
    if field.minimum is not None and value < field.minimum or field.maximum is not None and value > field.maximum:
        raise InvalidRequest(field.name, value, field.allowed())
    if field.multiple_of and value % field.multiple_of:
        raise InvalidRequest(field.name, value, field.allowed())
    return value


def check_fields(request: Txt2ImgRequest, spec: ModelSpec) -> Txt2ImgRequest:
    """A copy of the request with defaults filled in from the spec and every field checked, but for what its
    prompts say (read once, with the plan: sdtrt.requests.plan.validate checks both)."""
    values = {}
    for name, value in request.as_dict().items():
        field = spec.field(name)
        values[name] = check_value(field, field.default if value is None else value)
    resolve(values["sampler"], values["schedule_type"], spec.schedules)  # not every sampler follows every schedule
    checked = type(request)(**values)
    if checked.enable_hr:
        check_hires_size(checked, spec)
        check_hires_sampler(checked, spec)
        if checked.hr_upscaler in spec.upscalers:
            request_tiling(checked).of(spec.upscalers[checked.hr_upscaler].get("tiling", "grid"))
    if checked.vae:
        checked = replace(checked, vae=registered_vae(spec, checked.vae, checked.tiling))
    if checked.tiling and not spec.tiles:
        raise InvalidRequest("tiling", True, f"false for model {spec.key!r}: it was exported without its tiling "
                             "networks; export it again with `sdtrt export ... --tiling`")
    if checked.restore_faces and not spec.face_restorers:
        raise InvalidRequest("restore_faces", True, f"false for model {spec.key!r}: it was exported without face "
                             "restorers; export it again with `sdtrt export ... --face-restorers DIR`")
    if asks_for_hypertile(checked):
        check_hypertile(checked, spec)
    check_pixel_steps(checked, spec)
    check_randn_source(checked)
    check_sampler_steps(checked)
    check_sampler_settings(checked)
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        value = getattr(checked, name)
        if 0 < value < spec.vae_scale_factor:
            raise InvalidRequest(name, value, f"0 or -1 (off), or at least {spec.vae_scale_factor} pixels (one latent "
                                              f"cell), at most {spec.field(name).maximum:g}")
    return checked


def request_tiling(request: Txt2ImgRequest) -> Tiling:
    """A1111's tiling options for the request's upscaler models (its ESRGAN_tile, SWIN_tile, DAT_tile fields)."""
    return Tiling.from_fields(lambda name: getattr(request, name))


def face_restorer(spec: ModelSpec, name: str) -> str:
    """The restorer a request's face_restorer names: itself, or for "" CodeFormer where the model has it (A1111's
    default), else its other one."""
    return name or ("CodeFormer" if "CodeFormer" in spec.face_restorers else next(iter(spec.face_restorers), ""))


def registered_vae(spec: ModelSpec, name: str, tiling: bool = False) -> str:
    """The VAE a request names, as the key of the model's registered ones (by file name or stem), "" for the
    model's own (A1111's Automatic and None, or the file the export put in its place)."""
    own = spec.extra.get("vae", {}).get("name")
    if name in OWN_VAE_NAMES or name == own or (own and name == own.rsplit(".", 1)[0]):
        return ""
    found = next((key for key in spec.vaes if name in (key, key.rsplit(".", 1)[0])), None)
    if found is None:
        known = ", ".join(repr(key) for key in spec.vaes) or "none"
        raise InvalidRequest("vae", name, f"one of the VAEs model {spec.key!r} was exported with ({known}), or "
                                          "empty for its own; `sdtrt export ... --vaes DIR` adds a folder's")
    if tiling:
        raise InvalidRequest("vae", name, "empty (the model's own VAE) with tiling: the registered VAEs have no "
                                          "tiling variants")
    return found


def check_sampler_steps(request: Txt2ImgRequest) -> None:
    """A sampler with a step ceiling of its own (LCM) says so before it runs."""
    most = SAMPLERS[request.sampler].max_steps
    for name in ("steps", "hr_second_pass_steps"):
        value = getattr(request, name, 0) or 0
        if most and value > most:
            raise InvalidRequest(name, value, f"at most {most} with sampler {request.sampler!r}")


def check_sampler_settings(request: Txt2ImgRequest) -> None:
    """A1111's uncond skipping lives in its CFG denoisers: k-diffusion's, and its own timestep samplers' on their
    timesteps; the samplers only diffusers runs do not take it. Nor do they take A1111's schedule and noise-level
    options (A1111's timestep samplers take some: SamplerSettings.a1111_only)."""
    sampler = SAMPLERS[request.sampler]
    a1111_timesteps = sampler.t_function is not None and request.schedule_type == DEFAULT_SCHEDULE
    settings = SamplerSettings.of(request)
    if sampler.k_function is None and not a1111_timesteps and settings.a1111_only(request.schedule_type):
        name = settings.a1111_only(request.schedule_type)[0]
        raise InvalidRequest(name, getattr(request, name),
                             f"{getattr(SamplerSettings(), name)!r} with sampler {request.sampler!r} and schedule "
                             f"type {request.schedule_type!r}: A1111's samplers take it (the k-diffusion ones, "
                             "and on the Automatic schedule its own timestep ones), diffusers' classes do not")
    if sampler.t_function == "unipc" and not a1111_timesteps and settings.unipc != UniPcOptions():
        changed = next(f"unipc_{k}" for k, v in vars(settings.unipc).items() if getattr(UniPcOptions(), k) != v)
        raise InvalidRequest(changed, getattr(request, changed), f"{getattr(UniPcOptions(), changed[6:])!r} with "
                             f"schedule type {request.schedule_type!r}: A1111's own UniPC takes it, on the "
                             "Automatic schedule")
    if settings.sigma_min and settings.sigma_max and settings.sigma_min >= settings.sigma_max:
        raise InvalidRequest("sigma_min", settings.sigma_min, f"below sigma_max ({settings.sigma_max:g}), or 0 "
                                                              "for the model's")
    for name in ("s_min_uncond", "skip_early_cond"):
        value = getattr(request, name, 0) or 0
        if value > 0 and sampler.k_function is None and not a1111_timesteps:
            takers = [n for n, s in SAMPLERS.items() if (s.k_function or s.t_function) and s.schedule == "Automatic"]
            raise InvalidRequest(name, value,
                                 f"0 with sampler {request.sampler!r} and schedule type {request.schedule_type!r} "
                                 "(sdtrt skips the uncond with the k-diffusion samplers and, on the Automatic "
                                 f"schedule, A1111's own timestep ones: {', '.join(repr(n) for n in takers)})")


def check_randn_source(request: Txt2ImgRequest) -> None:
    """NV gives A1111's starting noise, and its step noise where k-diffusion runs the sampler; a sampler only
    diffusers runs would still draw its step noise from torch's CPU generators, so its picture would be neither
    A1111's nor sdtrt's CPU one."""
    if request.randn_source == "NV" and draws_step_noise(request.sampler) and not SAMPLERS[request.sampler].k_function:
        allowed = ", ".join(name for name in SAMPLERS if not draws_step_noise(name) or SAMPLERS[name].k_function)
        raise InvalidRequest("randn_source", request.randn_source,
                             f"CPU with {request.sampler!r}, which adds noise at every step and only diffusers "
                             f"runs; NV works with: {allowed}")


def hires_request(request: Txt2ImgRequest) -> Txt2ImgRequest:
    """The request as its hires pass runs it: A1111's "Hires sampler" and "Hires schedule type" where given, and
    the pass's own steps."""
    sampler = request.hr_sampler or request.sampler
    # A1111's own timestep samplers ignore the schedule type: a first pass's does not carry over to them
    inherited = DEFAULT_SCHEDULE if SAMPLERS[sampler].t_function and request.hr_sampler else request.schedule_type
    return replace(request, sampler=sampler,
                               schedule_type=request.hr_schedule_type or inherited,
                               steps=request.hr_second_pass_steps or request.steps, hr_second_pass_steps=0)


def check_hires_sampler(request: Txt2ImgRequest, spec: ModelSpec) -> None:
    """The hires pass's sampler checked as the first pass's is, its refusals naming the hires fields."""
    if not request.hr_sampler and not request.hr_schedule_type:
        return
    second = hires_request(request)
    try:
        resolve(second.sampler, second.schedule_type, spec.schedules)
        check_sampler_steps(second)
        check_sampler_settings(second)
        check_randn_source(second)
    except InvalidRequest as exc:
        field = {"sampler": "hr_sampler", "schedule_type": "hr_schedule_type", "steps": "hr_second_pass_steps"}.get(
            exc.field, exc.field)
        raise InvalidRequest(field, getattr(request, field), exc.allowed) from None


def hires_target(request: Txt2ImgRequest, spec: ModelSpec) -> HiresSize:
    """The hires fix's upscale and second-pass sizes for the request (A1111's scale or "Resize width/height to")."""
    return hires_size(request.width, request.height, request.hr_scale, request.hr_resize_x, request.hr_resize_y,
                      spec.vae_scale_factor)


def check_hires_size(request: Txt2ImgRequest, spec: ModelSpec) -> None:
    """The upscale and the second pass within the sizes the model takes, named by the field that sets them."""
    size = hires_target(request, spec)
    smallest, largest = spec.field("width").minimum, spec.field("width").maximum
    if not request.hr_resize_x and not request.hr_resize_y:
        if max(size.upscale) > largest:
            raise InvalidRequest("hr_scale", request.hr_scale,
                                 f"at most {largest / max(request.width, request.height):g} for "
                                 f"{request.width}x{request.height} (the model takes at most {largest:g} pixels a side)")
        return
    field = "hr_resize_x" if request.hr_resize_x else "hr_resize_y"
    if max(size.upscale) > largest or min(size.final) < smallest:
        raise InvalidRequest(field, getattr(request, field),
                             f"a size whose upscale of {request.width}x{request.height} (here "
                             f"{size.upscale[0]}x{size.upscale[1]}) is at most {largest:g} pixels a side and whose "
                             f"crop (here {size.final[0]}x{size.final[1]}) is at least {smallest:g}")


def pixel_steps(request: Txt2ImgRequest, spec: ModelSpec) -> tuple[int, float, int]:
    """(pixel-steps the request takes as the loops run it, pixel-steps one more step adds, pixel-steps that do not
    follow ``steps``). img2img runs steps x strength steps; the hires fix adds a pass of (its own steps, or steps)
    x strength at the upscaled size."""
    first = request.width * request.height * request.batch_size
    strength = request.denoising_strength
    if isinstance(request, Img2ImgRequest):
        return first * int(request.steps * strength), first * strength, 0
    total, per_step, fixed = first * request.steps, float(first), 0
    if request.enable_hr:
        width, height = hires_target(request, spec).final
        second = width * height * request.batch_size
        hires = second * int((request.hr_second_pass_steps or request.steps) * strength)
        total += hires
        if request.hr_second_pass_steps:
            fixed = hires
        else:
            per_step += second * strength
    return total, per_step, fixed


def check_pixel_steps(request: Txt2ImgRequest, spec: ModelSpec) -> None:
    """The spec's ceiling on one request's work, named by the field a user most likely turns down (steps)."""
    limit = spec.max_pixel_steps
    total, per_step, fixed = pixel_steps(request, spec)
    if not limit or total <= limit:
        return
    most = int((limit - fixed) // per_step)
    shape = f"{request.width}x{request.height} x {request.batch_size} image{'s' if request.batch_size > 1 else ''}"
    shape += " with the hires pass" if request.enable_hr else ""
    what = f"at most {most} for {shape}" if most >= 1 else f"1 or more, but {shape} is too large even so"
    raise InvalidRequest("steps", request.steps, f"{what}: this server takes at most {limit:,} pixel-steps a request "
                         "(width x height x batch_size x steps, hires pass included; lower any of them)")


def resolve_seeds(request: Txt2ImgRequest) -> Txt2ImgRequest:
    """-1 seeds replaced by random ones (the variation seed only when it is used)."""
    subseed = resolve_seed(request.subseed) if request.subseed_strength > 0 else request.subseed
    return replace(request, seed=resolve_seed(request.seed), subseed=subseed)
