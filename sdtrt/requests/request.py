"""The requests (txt2img, img2img): their fields (names, wire dtypes, defaults, limits) and their validation.

The table is built here once per model at export time and stored in the spec; servers, clients and the
CLI validate against the spec's copy, so every error names the field and its allowed range the same way.
"""

from __future__ import annotations

import math

import numpy as np
import dataclasses
from dataclasses import asdict, dataclass, replace
from typing import Any

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.hires import DEFAULT_UPSCALER, HIRES_UPSCALERS
from sdtrt.requests.img2img import INPAINTING_FILLS, RESIZE_MODES
from sdtrt.contract.samplers import DEFAULT_SAMPLER, DEFAULT_SCHEDULE, SCHEDULE_TYPES, check_available, resolve, sampler_names
from sdtrt.contract.seeds import MAX_SEED, RANDOM_SEED, resolve_seed
from sdtrt.contract.spec import FieldSpec, ModelSpec

MAX_STEPS = 150  # AUTOMATIC1111's slider maximum
RANDN_SOURCES = ("CPU", "NV")
MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class Txt2ImgRequest:
    """A txt2img job's settings. Any left None takes the served model's default: the defaults, like the limits,
    exist once, in the spec's request table (``request_fields``, written at export); ``validate`` fills them in
    and checks every value."""

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None  # -1 picks one
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    schedule_type: str | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int | None = None
    clip_skip: int | None = None
    subseed: int | None = None
    subseed_strength: float | None = None
    denoising_strength: float | None = None  # the hires pass's (txt2img) or the init image's (img2img)
    enable_hr: bool | None = None
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = None  # 0: the same as steps
    randn_source: str | None = None  # "CPU" (torch's CPU generator) or "NV" (an NVIDIA GPU's numbers, A1111's NV)
    seed_resize_from_w: int | None = None  # A1111's "Resize seed from width/height"; 0 or -1: off
    seed_resize_from_h: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Img2ImgRequest(Txt2ImgRequest):
    """img2img and inpainting settings; the init image and the mask travel beside the request, as arrays."""

    resize_mode: str | None = None
    mask_blur: int | None = None
    inpaint_full_res: bool | None = None  # A1111's "Inpaint area: Only masked"
    inpaint_full_res_padding: int | None = None
    inpainting_fill: str | None = None  # A1111's "Masked content"


def job_fields(request_type: type) -> tuple[str, ...]:
    """The request fields a job takes, in order (the dataclass's fields; their facts are in the spec)."""
    return tuple(f.name for f in dataclasses.fields(request_type))


def request_fields(
    native_size: int, min_size: int, max_size: int, size_multiple: int, max_batch: int, clip_layers: int = 12,
    max_prompt_chars: int | None = None,
) -> dict[str, FieldSpec]:
    """The request table for one model; export stores it in the spec."""
    fields = [
        FieldSpec("prompt", "string", "", "what to draw", max_length=max_prompt_chars),
        FieldSpec("negative_prompt", "string", "", "what to steer away from", max_length=max_prompt_chars),
        FieldSpec("seed", "int64", RANDOM_SEED,
                  "seed of image 0; image i uses seed+i (all use seed while a variation seed is on); -1 picks one",
                  minimum=RANDOM_SEED, maximum=MAX_SEED),
        FieldSpec("steps", "int32", 20, "sampling steps", minimum=1, maximum=MAX_STEPS),
        FieldSpec("guidance_scale", "float32", 7.0, "classifier-free guidance (CFG) scale; <= 1 turns guidance off",
                  minimum=0.0, maximum=MAX_GUIDANCE),
        FieldSpec("sampler", "string", DEFAULT_SAMPLER, "AUTOMATIC1111 sampler name", choices=sampler_names()),
        FieldSpec("schedule_type", "string", DEFAULT_SCHEDULE,
                  "noise schedule (A1111's 'Schedule type'); Automatic = A1111's choice for the sampler", choices=tuple(SCHEDULE_TYPES)),
        FieldSpec("width", "int32", native_size, "image width in pixels", minimum=min_size, maximum=max_size,
                  multiple_of=size_multiple),
        FieldSpec("height", "int32", native_size, "image height in pixels", minimum=min_size, maximum=max_size,
                  multiple_of=size_multiple),
        FieldSpec("batch_size", "int32", 1, "images generated together from one prompt", minimum=1, maximum=max_batch),
        FieldSpec("clip_skip", "int32", 1, "use the output of CLIP's n-th layer from the end (A1111's Clip skip)",
                  minimum=1, maximum=min(12, clip_layers)),
        FieldSpec("subseed", "int64", RANDOM_SEED, "variation seed of image 0 (image i uses subseed+i); -1 picks one",
                  minimum=RANDOM_SEED, maximum=MAX_SEED),
        FieldSpec("subseed_strength", "float32", 0.0, "how far each image's noise moves towards its variation seed's",
                  minimum=0.0, maximum=1.0),
        FieldSpec("denoising_strength", "float32", 0.75,
                  "how much of the init image (img2img) or first pass (hires fix) is redrawn", minimum=0.0, maximum=1.0),
        FieldSpec("enable_hr", "bool", False, "hires fix: upscale the first pass and redraw it at the larger size"),
        FieldSpec("hr_scale", "float32", 2.0, "hires fix: upscale factor", minimum=1.0, maximum=4.0),
        FieldSpec("hr_upscaler", "string", DEFAULT_UPSCALER, "hires fix: upscaler", choices=tuple(HIRES_UPSCALERS)),
        FieldSpec("hr_second_pass_steps", "int32", 0, "hires fix: steps of the second pass; 0 = the same as steps",
                  minimum=0, maximum=MAX_STEPS),
        FieldSpec("randn_source", "string", "CPU",
                  "where the starting noise comes from: CPU (torch's CPU generator, as diffusers and A1111's CPU "
                  "option) or NV (the numbers an NVIDIA GPU gives for the seed, as A1111's NV and GPU options)",
                  choices=RANDN_SOURCES),
        FieldSpec("seed_resize_from_w", "int32", 0, "draw the seed's noise as for this width, centred in the image "
                  "(A1111's 'Resize seed from width'); 0 or -1: off", minimum=-1, maximum=max_size),
        FieldSpec("seed_resize_from_h", "int32", 0, "draw the seed's noise as for this height, centred in the image "
                  "(A1111's 'Resize seed from height'); 0 or -1: off", minimum=-1, maximum=max_size),
        FieldSpec("resize_mode", "string", "Just resize", "img2img: how the init image is fitted to width x height",
                  choices=tuple(RESIZE_MODES)),
        FieldSpec("mask_blur", "int32", 4, "inpainting: Gaussian blur radius of the mask, in pixels",
                  minimum=0, maximum=64),
        FieldSpec("inpaint_full_res", "bool", False,
                  "inpainting: redraw only the masked area, at full resolution (A1111's 'Only masked')"),
        FieldSpec("inpaint_full_res_padding", "int32", 32, "inpainting: pixels of context around the masked area",
                  minimum=0, maximum=256),
        FieldSpec("inpainting_fill", "string", "original", "inpainting: what the masked area starts from (A1111's "
                  "'Masked content'): fill (the colours around it), original, latent noise, latent nothing",
                  choices=INPAINTING_FILLS),
    ]
    return {f.name: f for f in fields}


def check_value(field: FieldSpec, value: Any) -> Any:
    """Coerce one value to the field's type and check it against the field's limits."""
    if field.dtype == "bool":
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            return bool(value)
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


def validate(request: Txt2ImgRequest, spec: ModelSpec) -> Txt2ImgRequest:
    """A copy of the request with defaults filled in from the spec and every field checked."""
    values = {}
    for name, value in request.as_dict().items():
        field = spec.field(name)
        if name == "sampler" and value is not None:
            check_available(value)  # an A1111 sampler sdtrt does not run: say why and what to use
        values[name] = check_value(field, field.default if value is None else value)
    resolve(values["sampler"], values["schedule_type"], spec.schedules)  # not every sampler follows every schedule
    checked = type(request)(**values)
    if checked.enable_hr:
        from sdtrt.contract.hires import target_size

        width, height = target_size(checked.width, checked.height, checked.hr_scale, spec.vae_scale_factor)
        largest = spec.field("width").maximum
        if max(width, height) > largest:
            raise InvalidRequest("hr_scale", checked.hr_scale,
                                 f"at most {largest / max(checked.width, checked.height):g} for "
                                 f"{checked.width}x{checked.height} (the model takes at most {largest:g} pixels a side)")
    check_pixel_steps(checked, spec)
    check_extra_networks(checked, spec)
    check_composable(checked, spec)
    check_randn_source(checked)
    check_sampler_steps(checked)
    for name in ("seed_resize_from_w", "seed_resize_from_h"):
        value = getattr(checked, name)
        if 0 < value < spec.vae_scale_factor:
            raise InvalidRequest(name, value, f"0 or -1 (off), or at least {spec.vae_scale_factor} pixels (one latent "
                                              f"cell), at most {spec.field(name).maximum:g}")
    return checked


def check_sampler_steps(request: Txt2ImgRequest) -> None:
    """A sampler with a step ceiling of its own (LCM) says so before it runs."""
    from sdtrt.contract.samplers import SAMPLERS

    most = SAMPLERS[request.sampler].max_steps
    for name in ("steps", "hr_second_pass_steps"):
        value = getattr(request, name, 0) or 0
        if most and value > most:
            raise InvalidRequest(name, value, f"at most {most} with sampler {request.sampler!r}")


def check_randn_source(request: Txt2ImgRequest) -> None:
    """NV gives A1111's starting noise; a sampler that adds noise at every step would still take that noise from
    the CPU generators (diffusers draws it), so the picture would be neither A1111's nor sdtrt's CPU one."""
    from sdtrt.contract.samplers import SAMPLERS, draws_step_noise

    if request.randn_source == "NV" and draws_step_noise(request.sampler):
        deterministic = ", ".join(name for name in SAMPLERS if not draws_step_noise(name))
        raise InvalidRequest("randn_source", request.randn_source,
                             f"CPU with {request.sampler!r}, which adds noise at every step; NV works with the "
                             f"samplers that do not: {deterministic}")


def check_composable(request: Txt2ImgRequest, spec: ModelSpec) -> None:
    """A1111's AND (composable diffusion) runs each subprompt as its own U-Net rows beside the uncond's: the
    images times (subprompts + 1) must fit one U-Net call of this model."""
    from sdtrt.requests.prompt_schedule import composable_prompts
    from sdtrt.contract.spec import UNET_BATCH

    subprompts = len(composable_prompts(request.prompt))
    rows = request.batch_size * (subprompts + 1)
    most = spec.dims[UNET_BATCH].max
    if subprompts > 1 and rows > most:
        raise InvalidRequest("prompt", request.prompt,
                             f"at most {most // request.batch_size - 1} AND subprompts at batch size "
                             f"{request.batch_size} (each image's subprompts and uncond run as one U-Net call of at "
                             f"most {most} rows here); this prompt has {subprompts}")


def check_extra_networks(request: Txt2ImgRequest, spec: ModelSpec) -> None:
    """Every <lora:...> tag names a LoRA registered for the model, and their summed rank fits the export."""
    from sdtrt.requests.extra_networks import request_loras
    from sdtrt.contract.spec import LORA_RANK

    rank = spec.dims[LORA_RANK].max if LORA_RANK in spec.dims else 0
    request_loras(request.prompt, request.negative_prompt, spec.loras, rank)


def pixel_steps(request: Txt2ImgRequest, spec: ModelSpec) -> tuple[int, float, int]:
    """(pixel-steps the request takes as the loops run it, pixel-steps one more step adds, pixel-steps that do not
    follow ``steps``). img2img runs steps x strength steps; the hires fix adds a pass of (its own steps, or steps)
    x strength at the upscaled size."""
    from sdtrt.contract.hires import target_size

    first = request.width * request.height * request.batch_size
    strength = request.denoising_strength
    if isinstance(request, Img2ImgRequest):
        return first * int(request.steps * strength), first * strength, 0
    total, per_step, fixed = first * request.steps, float(first), 0
    if request.enable_hr:
        width, height = target_size(request.width, request.height, request.hr_scale, spec.vae_scale_factor)
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
