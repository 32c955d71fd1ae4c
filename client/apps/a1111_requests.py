"""A1111's txt2img and img2img requests, and their translation into sdtrt's settings: pure functions of the
request, the user's A1111 options, the styles and the server's catalog (no server is called here; the routes in
a1111_api.py do that).

As A1111 does, keys it does not know are ignored; unlike A1111, the gateway says which (ignored_fields). A field
the server cannot honour (face restoration, always-on scripts, refiners, ...) is refused with 422 naming it when its value
would change the picture; a value equal to what sdtrt does anyway is accepted (``eta`` 1 for ancestral samplers,
``s_tmax`` without churn, ``image_cfg_scale`` on a model that is not instruct-pix2pix, ...).
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from sdtrt.client.client import JobControl
from sdtrt.contract.errors import ERROR_KINDS, InvalidRequest, UsageError
from sdtrt.contract.files import write_atomic
from sdtrt.contract.pictures import open_picture, picture_bytes_from_base64
from sdtrt.contract.samplers import SAMPLERS, SCHEDULE_TYPES
from sdtrt.contract.seeds import MAX_SEED
from sdtrt.contract.spec import IMG2IMG, OWN_VAE_NAMES, TXT2IMG, Catalog, ModelSpec
from sdtrt.requests.fields import A1111_AS_IS, A1111_NAMES, BY_NAME, FIELDS, RequestField
from sdtrt.requests.generation import check_n_iter, settings_from_infotext
from sdtrt.requests.infotext import check_infotext
from sdtrt.requests.styles import apply_styles
from sdtrt.postprocessing.faces import ExtrasFaces
from sdtrt.postprocessing.upscale import EXTRAS_UPSCALERS, MAX_SIDE, NO_UPSCALER, ExtrasUpscale, check_upscale

# A1111's scheduler names (its API takes name or label) -> sdtrt schedule types
SCHEDULER_NAMES = {label.lower().replace(" ", "_"): label for label in SCHEDULE_TYPES}  # A1111's names: "sgm_uniform"

NUMBERED = tuple(field for field in FIELDS if field.a1111_numbered)  # A1111 sends their choices by number


def choice_numbers(name: str) -> str:
    """"0 (just resize), 1 (crop and resize) or 2 (resize and fill)": a numbered field's choices by number."""
    numbers = [f"{i} ({choice.lower()})" for i, choice in enumerate(BY_NAME[name].choices)]
    return ", ".join(numbers[:-1]) + " or " + numbers[-1]


# sdtrt request field -> A1111's name, for naming it in a refusal; the pictures travel beside the fields
A1111_NAME = A1111_NAMES | {"init_image": "init_images", "mask": "mask"}
# A1111's sampler options -> the sdtrt field whose range each takes (their defaults: a1111_defaults()); a
# request's own value wins (eta_ancestral or eta_ddim stands for eta as the sampler is DDIM or not, as A1111 reads
# them)
SAMPLER_OPTIONS = {"eta_ancestral": "eta", "eta_ddim": "eta", "eta_noise_seed_delta": "eta_noise_seed_delta",
                   "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise",
                   "s_min_uncond": "s_min_uncond", "skip_early_cond": "skip_early_cond",
                   **{name: name for name in ("sigma_min", "sigma_max", "rho", "beta_dist_alpha", "beta_dist_beta",
                                              "img2img_extra_noise")},
                   # (not the sampler's: the upscaler models' tiles, as A1111's ESRGAN-family upscalers and its
                   # SwinIR take them)
                   "ESRGAN_tile": "upscaler_tile", "ESRGAN_tile_overlap": "upscaler_tile_overlap",
                   "SWIN_tile": "swinir_tile", "SWIN_tile_overlap": "swinir_tile_overlap",
                   "DAT_tile": "dat_tile", "DAT_tile_overlap": "dat_tile_overlap",
                   "uni_pc_order": "unipc_order", "sdxl_crop_top": "sdxl_crop_top", "sdxl_crop_left": "sdxl_crop_left",
                   "comma_padding_backtrack": "comma_padding_backtrack"}
SIGMA_OPTIONS = tuple(name for name in SAMPLER_OPTIONS if name.startswith("s_"))  # also request fields
# Hypertile's numbers, request fields of the same names (its switches are among SAMPLER_FLAGS)
HYPERTILE_OPTIONS = tuple(f.name for f in FIELDS if f.name.startswith("hypertile_") and f.dtype != "bool")
HYPERTILE_FLAGS = tuple(f.name for f in FIELDS if f.name.startswith("hypertile_") and f.dtype == "bool")
SAMPLER_OPTIONS.update({name: name for name in HYPERTILE_OPTIONS})
TILE_OPTIONS = ("ESRGAN_tile", "ESRGAN_tile_overlap", "SWIN_tile", "SWIN_tile_overlap", "DAT_tile", "DAT_tile_overlap")
SCHEDULE_OPTIONS = ("sigma_min", "sigma_max", "rho", "beta_dist_alpha", "beta_dist_beta")  # request fields too
OPTIONS_HONOURED = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "randn_source", *SAMPLER_OPTIONS)
# A1111's on/off options for its samplers, request fields of the same names
SAMPLER_FLAGS = ("use_old_karras_scheduler_sigmas", "always_discard_next_to_last_sigma", "sgm_noise_multiplier",
                 "use_downcasted_alpha_bar", *HYPERTILE_FLAGS)
# A1111's options that name a choice -> the request fields that take them
CHOICE_OPTIONS = {"sd_noise_schedule": "sd_noise_schedule", "emphasis": "emphasis",
                  "hires_fix_refiner_pass": "hires_refiner_pass", "uni_pc_variant": "unipc_variant",
                  "uni_pc_skip_type": "unipc_skip_type"}
# kept with the options sdtrt has no use for, and read when a request runs
OPTIONS_KEPT_AND_READ = ("tiling", "pad_cond_uncond", "pad_cond_uncond_v0", "enable_prompt_comments", "img2img_fix_steps",
                         "s_min_uncond_all", *CHOICE_OPTIONS, *SAMPLER_FLAGS, "refiner_switch_by_sample_steps",
                         "sd_vae", "sdxl_clip_l_skip", "uni_pc_lower_order_final", "face_restoration")
# A1111's noise sources -> sdtrt's: its GPU source on an NVIDIA card gives NV's numbers
RANDN_SOURCES = {"CPU": "CPU", "NV": "NV", "GPU": "NV"}
# A1111 options that change the picture, with the values sdtrt draws with; other values are refused by name
# (none now: Hypertile, the last, is served by models exported with --hypertile).
OPTIONS_FIXED: dict[str, tuple] = {}


# What one request may ask of the gateway, checked before any work starts (pictures: sdtrt.contract.pictures; the
# generation itself: the model's spec, checked by the client before anything is sent).
MAX_STYLES = 64  # styles named in one request
MAX_NAME_CHARS = 256  # a style's name, a task id
MAX_OPTIONS = 2000  # A1111 options kept per user (A1111 has about 500)
MAX_OPTIONS_BYTES = 2**20  # their JSON, all together


def as_is_fields(tab: str | None) -> dict[str, Any]:
    """The schema of the fields sdtrt takes as A1111 sends them, from sdtrt's field table, with A1111's API
    defaults: those both of A1111's requests have (tab None), or only ``tab``'s."""
    shown = (TXT2IMG, IMG2IMG) if tab is None else (tab,)
    return {f.a1111: (f.python_type | None if f.a1111_default is None else f.python_type,
                      Field(f.a1111_default, description=f.help))
            for f in FIELDS if f.a1111_as_is and f.shown_in == shown}


class _RequestBase(BaseModel):
    """Fields common to A1111's txt2img and img2img requests that sdtrt translates or refuses, with A1111's API
    defaults; those it takes as they are come from sdtrt's field table (as_is_fields)."""

    model_config = ConfigDict(extra="allow")  # as A1111: unknown keys are ignored (and listed: ignored_fields)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """A1111's request models take ``null`` for any field, meaning its default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    styles: list[str] | None = Field(None, description="prompt styles by name (GET /sdapi/v1/prompt-styles)")
    sampler_name: str | None = Field(None, description="A1111 sampler name or alias (GET /sdapi/v1/samplers)")
    sampler_index: str = Field("Euler", description="legacy name of sampler_name, used when that is absent")
    scheduler: str | None = Field(None, description="Automatic, Karras, Exponential or SGM Uniform")
    n_iter: int = 1
    restore_faces: bool | None = Field(None, description="restore faces (a model exported with --face-restorers); "
                                       "null: the face_restoration option")
    tiling: bool | None = Field(None, description="seamless tiling (a model exported with --tiling); null: the "
                                "tiling option")
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, description="null: the eta_ancestral option (DDIM: eta_ddim)")
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = Field(
        None, description=f"only {', '.join(OPTIONS_HONOURED + OPTIONS_KEPT_AND_READ)}")
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = Field(None, description="one of GET /sdapi/v1/scripts (Prompt matrix, X/Y/Z plot; "
                                    "img2img: Loopback, SD upscale)")
    script_args: list[Any] = Field(default_factory=list, description="the script's arguments in A1111's order")
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = Field(None, description="fill the settings from an A1111 infotext (fields given win)")


_Request = create_model("_Request", __base__=_RequestBase, __module__=__name__, **as_is_fields(None))


class _Txt2ImgBody(_Request):
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_upscaler: str | None = None
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    firstpass_image: str | None = None


Txt2ImgBody = create_model("Txt2ImgBody", __base__=_Txt2ImgBody, __module__=__name__, **as_is_fields(TXT2IMG))


class _Img2ImgBody(_Request):
    init_images: list[str] = Field(..., description="base64 pictures: one for the whole batch, or up to batch_size "
                                   "(one picture each)")
    resize_mode: int = Field(0, description=choice_numbers("resize_mode"))
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64 mask: white = repaint")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = Field(0, description="masked content: " + choice_numbers("inpainting_fill"))
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


Img2ImgBody = create_model("Img2ImgBody", __base__=_Img2ImgBody, __module__=__name__, **as_is_fields(IMG2IMG))


class ExtrasBody(BaseModel):
    """A1111's Extras on one picture: sdtrt's upscalers (GET /sdapi/v1/upscalers), then its face restorers
    (GET /sdapi/v1/face-restorers)."""

    model_config = ConfigDict(extra="allow")

    resize_mode: int = Field(0, description="0: upscale by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, description="GFPGAN's restored faces blended in at this share (0: off)")
    codeformer_visibility: float = Field(0.0, description="CodeFormer's restored faces blended in at this share")
    codeformer_weight: float = Field(0.0, description="CodeFormer's fidelity: 0 = the most change, 1 = the least")
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = NO_UPSCALER
    upscaler_2: str = NO_UPSCALER
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleImageBody(ExtrasBody):
    image: str = Field("", description="base64 picture")


class ExtrasImage(BaseModel):
    data: str = Field(..., description="base64 picture")
    name: str = Field("", description="its file name (A1111 names the result after it)")


MAX_EXTRAS_IMAGES = 16  # pictures one extra-batch-images request may upscale


class ExtrasBatchBody(ExtrasBody):
    imageList: list[ExtrasImage] = Field(default_factory=list, max_length=MAX_EXTRAS_IMAGES,
                                         description=f"at most {MAX_EXTRAS_IMAGES} pictures")


def face_settings(body: "_Request", mine: UserOptions) -> dict[str, Any]:
    """A1111's Restore faces: the request's restore_faces, else the user's face_restoration option; with it the
    face restoration model and CodeFormer's weight, from the override or the user's options (unset: the model's
    CodeFormer, else its GFPGAN; A1111's 0.5)."""
    if not option_flag(body, mine, "face_restoration", "restore_faces"):
        return {}
    settings: dict[str, Any] = {"restore_faces": True}
    for option, target in (("face_restoration_model", "face_restorer"), ("code_former_weight", "code_former_weight")):
        for where, value in ((f"override_settings.{option}", (body.override_settings or {}).get(option)),
                             (f"options.{option}", mine.options.get(option))):
            if value is None:
                continue
            kind, limits = (str, None) if target == "face_restorer" else ((int, float), BY_NAME[target])
            if isinstance(value, bool) or not isinstance(value, kind) or (
                    limits is not None and not limits.minimum <= value <= limits.maximum):
                wanted = "a face restorer name" if limits is None else \
                    f"a number from {limits.minimum:g} to {limits.maximum:g}"
                raise refuse(where, f"{wanted} "
                                    f"(got {str(value)[:80]!r})")
            settings[target] = value
            break
    return settings


def other_checkpoints(body: "_Request", catalog: Catalog) -> dict[str, Any]:
    """A1111's refiner and hires checkpoint (by title, name, file name or hash) as sdtrt's model names; their
    "none" values as none."""
    settings: dict[str, Any] = {}
    for name, target, unset in (("refiner_checkpoint", "refiner_checkpoint", (None, "", "None")),
                                ("hr_checkpoint_name", "hr_checkpoint", (None, "", "Use same checkpoint"))):
        value = getattr(body, name, None)
        if value not in unset:
            settings[target] = find_model(catalog, value, name)
    if settings.get("refiner_checkpoint"):  # (A1111: none means from the first step)
        settings["refiner_switch_at"] = 0.0 if body.refiner_switch_at is None else body.refiner_switch_at
    return settings


def sampler_settings(body: "_Request", sampler: str, options: dict[str, Any]) -> dict[str, Any]:
    """eta, sigma churn, s_noise, NGMS and ENSD as A1111 reads them: the request's value, else the user's option
    (``options``: A1111's sampler options, defaults filled)."""
    settings = {name: options[name] if getattr(body, name) is None else getattr(body, name)
                for name in SIGMA_OPTIONS}
    timesteps = sampler in SAMPLERS and SAMPLERS[sampler].t_function is not None  # A1111's CompVis samplers
    eta_option = "eta_ddim" if timesteps else "eta_ancestral"
    eta = options[eta_option] if body.eta is None else body.eta
    default = SAMPLERS[sampler].eta if sampler in SAMPLERS else None
    if default is not None and eta != default:  # else the sampler's own (-1), and no "Eta" in the infotext
        settings["eta"] = eta
    settings["eta_noise_seed_delta"] = options["eta_noise_seed_delta"]
    defaults = a1111_defaults()
    for name in ("skip_early_cond", *SCHEDULE_OPTIONS, *TILE_OPTIONS, *HYPERTILE_OPTIONS, "uni_pc_order",
                 "sdxl_crop_top", "sdxl_crop_left", "comma_padding_backtrack"):
        if options[name] != defaults[name]:
            settings[SAMPLER_OPTIONS[name]] = options[name]
    second_pass = isinstance(body, Img2ImgBody) or getattr(body, "enable_hr", False)
    if options["img2img_extra_noise"] and second_pass:  # (img2img's and the hires pass's)
        settings["img2img_extra_noise"] = options["img2img_extra_noise"]
    return settings


def chosen_options(body: "_Request", mine: UserOptions) -> dict[str, Any]:
    """A1111's on/off sampler options and its options that name a choice (the request fields of those names, whose
    choices they take), from the override or the user's options."""
    settings: dict[str, Any] = {name: True for name in SAMPLER_FLAGS if option_flag(body, mine, name)}
    for name, target in CHOICE_OPTIONS.items():
        for where, value in (("override_settings", (body.override_settings or {}).get(name)),
                             ("options", mine.options.get(name))):
            if value is not None:
                choices = BY_NAME[target].choices
                if value not in choices:
                    raise refuse(f"{where}.{name}", f"one of {', '.join(map(repr, choices))} (got "
                                                    f"{str(value)[:80]!r})")
                settings[target] = value
                break
    if option_flag(body, mine, "refiner_switch_by_sample_steps"):
        settings["refiner_switch_by_steps"] = True
    if not option_flag(body, mine, "uni_pc_lower_order_final", default=True):
        settings["unipc_lower_order_final"] = False
    return settings


def refuse(field: str, message: str) -> HTTPException:
    return HTTPException(ERROR_KINDS["InvalidRequest"]["gateway"],
                         detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def open_image(data: str, field: str) -> Image.Image:
    """A base64 picture (a data: URL too), loaded with its text chunks, within sdtrt.contract.pictures' bounds (size,
    pixels, PNG/JPEG/WebP), checked before it is decoded; a named 422 otherwise."""
    try:
        return open_picture(picture_bytes_from_base64(data, field), field)
    except InvalidRequest as exc:
        raise refuse(field, str(exc)) from None


def decode_image(data: str, field: str, mode: str) -> Image.Image:
    return open_image(data, field).convert(mode)


@dataclass
class Job:
    """One generation under way: its control (interrupt, skip, the request id its progress is posted under)."""

    control: JobControl
    user: str  # who sent it: only they see its progress and stop it
    task_id: str  # A1111's id_task (the request's force_task_id, else a fresh one)
    kind: str
    count: int  # batches (n_iter)
    started: float
    timestamp: str
    done: int = 0  # batches finished

    @classmethod
    def for_request(cls, kind: str, body: _Request, user: str) -> "Job":
        """The server sees a fresh random id (its progress model answers whoever names one); A1111's task id,
        which a client may choose, only names the job in the gateway, among its own user's jobs."""
        return cls(JobControl(), user, body.force_task_id or uuid.uuid4().hex, kind, body.n_iter, time.time(),
                   time.strftime("%Y%m%d%H%M%S"))


@dataclass
class UserOptions:
    """One user's A1111 options. A1111 serves one user, whose options are the server's; sdtrt serves many (each
    set of credentials is a user; without credentials, loopback only, everyone is the one user "")."""

    clip_skip: int = 1
    randn_source: str = "CPU"
    model: str | None = None  # A1111's loaded checkpoint: options.sd_model_checkpoint (None: the default)
    sampler: dict[str, Any] = field(default_factory=dict)  # the SAMPLER_OPTIONS set (the rest: A1111's defaults)
    options: dict[str, Any] = field(default_factory=dict)  # A1111 options sdtrt has no use for, kept for GET


def load_user_options(path: Path) -> dict[str, UserOptions]:
    """Each user's options as ``save_user_options`` kept them; none when the file is absent. A file this gateway
    cannot read is an error naming it (not silently everyone's options lost)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return {user: UserOptions(**{k: v for k, v in fields.items() if k in USER_OPTION_KEYS})
                for user, fields in data["users"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path}: not an sdtrt options file ({type(exc).__name__}: {str(exc)[:200]}); move it "
                         "away to start from A1111's defaults") from None


def save_user_options(path: Path, users: dict[str, UserOptions]) -> None:
    """Written to a temporary name and renamed: a crash mid-write keeps the previous file."""
    data = {"users": {user: asdict(options) for user, options in users.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1, default=str))


@dataclass(frozen=True)
class OptionChanges:
    """What A1111 options set that sdtrt draws with (None: not set)."""

    clip_skip: int | None = None
    model: str | None = None  # the model's key in the catalog
    randn_source: str | None = None
    sampler: dict[str, Any] = field(default_factory=dict)  # SAMPLER_OPTIONS set
    vae: str | None = None  # sd_vae


USER_OPTION_KEYS = ("clip_skip", "randn_source", "model", "sampler", "options")


@functools.lru_cache(maxsize=1)
def a1111_defaults() -> dict[str, Any]:
    """Every option key A1111 1.10's GET /options returns (its options_templates and the built-in extensions':
    Lora, canvas zoom, extra options, hypertile, the upscalers'), with its default (null where A1111 computes it
    at start-up); options other extensions add come from the users who set them."""
    return json.loads((Path(__file__).parent / "a1111_options.json").read_text())


def sampler_options(mine: UserOptions) -> dict[str, Any]:
    """The user's A1111 sampler options, A1111's defaults where they set none."""
    return {name: mine.sampler.get(name, a1111_defaults()[name]) for name in SAMPLER_OPTIONS}


def find_model(catalog: Catalog, value: Any, field: str) -> str:
    """A1111 names a checkpoint by title, name, file name or hash; sdtrt by its key in the repository."""
    for key, spec in catalog.models.items():
        if value in (key, spec.title, spec.name, spec.model_hash, f"{spec.name}.safetensors"):
            return key
    titles = ", ".join(repr(spec.title) for spec in catalog.models.values())
    raise refuse(field, f"not one of this server's models: {titles}")


def find_vae(catalog: Catalog, value: Any, field: str) -> str:
    """A1111's sd_vae: Automatic, None, or a VAE file the server's models were exported with (by file name or
    stem); whether the request's model has it is the model's own check."""
    names = {name for spec in catalog.models.values() for name in spec.vaes}
    names |= {spec.extra["vae"]["name"] for spec in catalog.models.values() if spec.extra.get("vae")}
    if value in OWN_VAE_NAMES or value in names or value in {name.rsplit(".", 1)[0] for name in names}:
        return value
    listed = ", ".join(repr(n) for n in ("Automatic", "None", *sorted(names)))
    raise refuse(field, f"one of this server's VAEs: {listed} (got {str(value)[:80]!r}; `sdtrt export ... --vaes "
                        "DIR` registers a folder's)")


def read_options(options: dict[str, Any], where: str, catalog: Catalog) -> OptionChanges:
    """Check A1111 options. Options that would change the picture to something sdtrt does not draw are refused by
    name; the rest are kept (``/options``) or ignored and listed (``override_settings``), as A1111 keeps options
    it has no use for."""
    changes = OptionChanges()
    for key, value in options.items():
        if key == "sd_model_checkpoint":
            changes = replace(changes, model=find_model(catalog, value, f"{where}.sd_model_checkpoint"))
        elif key == "CLIP_stop_at_last_layers":
            changes = replace(changes, clip_skip=value)
        elif key == "randn_source":
            if value not in RANDN_SOURCES:
                raise refuse(f"{where}.randn_source", f"one of {', '.join(map(repr, RANDN_SOURCES))} (got "
                                                      f"{str(value)[:80]!r})")
            changes = replace(changes, randn_source=RANDN_SOURCES[value])
        elif key in SAMPLER_OPTIONS:
            allowed = BY_NAME[SAMPLER_OPTIONS[key]]
            low = 0 if key.startswith("eta_") else allowed.minimum  # (eta's -1 is sdtrt's "the option")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= allowed.maximum:
                raise refuse(f"{where}.{key}", f"a number from {low:g} to {allowed.maximum:g} "
                                               f"(got {str(value)[:80]!r})")
            changes = replace(changes, sampler={**changes.sampler, key: value})
        elif key in CHOICE_OPTIONS and value not in BY_NAME[CHOICE_OPTIONS[key]].choices:
            choices = ", ".join(repr(c) for c in BY_NAME[CHOICE_OPTIONS[key]].choices)
            raise refuse(f"{where}.{key}", f"one of {choices} (got {str(value)[:80]!r})")
        elif key == "sd_vae":
            changes = replace(changes, vae=find_vae(catalog, value, f"{where}.sd_vae"))
        elif key in OPTIONS_KEPT_AND_READ and key not in CHOICE_OPTIONS and not isinstance(value, bool):
            raise refuse(f"{where}.{key}", f"true or false (got {str(value)[:80]!r})")
        elif key in OPTIONS_FIXED and value not in OPTIONS_FIXED[key]:
            allowed = ", ".join(repr(a) for a in OPTIONS_FIXED[key])
            raise refuse(f"{where}.{key}", f"not supported by sdtrt: it draws with {allowed}")
    return changes


def updated_options(mine: UserOptions, options: dict[str, Any], catalog: Catalog, current: ModelSpec) -> UserOptions:
    """A user's options after A1111's POST /options: what sdtrt draws with is checked (Clip skip against the
    ``current`` model's range), everything else kept for GET, within MAX_OPTIONS."""
    kept = {**mine.options, **{k: v for k, v in options.items()
                               if k not in OPTIONS_HONOURED and k not in OPTIONS_FIXED}}
    if len(kept) > MAX_OPTIONS or len(json.dumps(kept, default=str)) > MAX_OPTIONS_BYTES:
        raise refuse("options", f"at most {MAX_OPTIONS} options of {MAX_OPTIONS_BYTES // 1024} kB in all are "
                                "kept per user")
    changes = read_options(options, "options", catalog)
    if changes.clip_skip is not None:
        clip = current.field("clip_skip")
        if not isinstance(changes.clip_skip, int) or not clip.minimum <= changes.clip_skip <= clip.maximum:
            raise refuse("options.CLIP_stop_at_last_layers", f"must be {clip.allowed()}")
    return replace(mine, clip_skip=mine.clip_skip if changes.clip_skip is None else changes.clip_skip,
                   randn_source=changes.randn_source or mine.randn_source, model=changes.model or mine.model,
                   sampler={**mine.sampler, **changes.sampler}, options=kept)


def ignored_fields(body: _Request, styles: dict) -> list[str]:
    """The request's keys that change nothing here: unknown ones, override_settings sdtrt has no use for, and
    styles the styles file lacks (A1111 skips them too)."""
    overrides = [f"override_settings.{k}" for k in body.override_settings or {}
                 if k not in OPTIONS_HONOURED + OPTIONS_KEPT_AND_READ and k not in OPTIONS_FIXED]
    unknown = [f"styles.{name}" for name in body.styles or [] if name not in styles]
    return body.ignored_fields + overrides + unknown


def check_bounds(body: _Request) -> None:
    """What a request asks for, bounded before anything is decoded, parsed or sent (the generation's own limits
    are the model's, checked by the client)."""
    try:
        check_n_iter(body.n_iter)
    except InvalidRequest as exc:
        raise refuse("n_iter", str(exc)) from None
    if body.styles is not None and (len(body.styles) > MAX_STYLES
                                    or any(len(name) > MAX_NAME_CHARS for name in body.styles)):
        raise refuse("styles", f"at most {MAX_STYLES} style names of at most {MAX_NAME_CHARS} characters each "
                               f"(got {len(body.styles)})")
    if isinstance(body, Img2ImgBody) and not body.init_images:
        raise refuse("init_images", "at least one picture")
    if body.force_task_id is not None and len(body.force_task_id) > MAX_NAME_CHARS:
        raise refuse("force_task_id", f"at most {MAX_NAME_CHARS} characters (got {len(body.force_task_id)})")
    if body.infotext is not None:
        try:
            check_infotext(body.infotext)
        except InvalidRequest as exc:
            raise refuse("infotext", str(exc)) from None


def with_infotext(body: _Request) -> _Request:
    """A1111 1.9+: the request's settings filled from its infotext; the fields the request gives win."""
    if not body.infotext:
        return body
    given = body.model_dump(exclude_unset=True)
    stored = {A1111_NAME.get(k, k): v for k, v in settings_from_infotext(body.infotext).items()}
    for field in NUMBERED:  # the infotext says these in words, A1111's API in numbers
        if field.a1111 in stored:
            if stored[field.a1111] not in field.choices:
                raise refuse(field.a1111, f"the infotext's {field.infotext} {str(stored[field.a1111])[:80]!r} is "
                                          f"not one of {', '.join(field.choices)}")
            stored[field.a1111] = field.choices.index(stored[field.a1111])
    given = {**{k: v for k, v in stored.items() if k in type(body).model_fields}, **given}
    # Clip skip, ENSD, RNG: A1111 options, which A1111 applies from an infotext as override settings (the text's
    # numbers as the fields' types; a value that is none is refused by the option's own check)
    overrides = {}
    for name, value in stored.items():
        if name.startswith("override_settings."):
            field = BY_NAME[next(f for f, a in A1111_NAMES.items() if a == name)]
            try:
                overrides[name.removeprefix("override_settings.")] = _infotext_value(field, value)
            except ValueError:
                raise refuse(name, f"the infotext's {field.infotext} {str(value)[:80]!r} is not a "
                                   f"{field.python_type.__name__}") from None
    if overrides:
        given["override_settings"] = {**overrides, **(given.get("override_settings") or {})}
    try:
        return type(body)(**given)
    except ValidationError as exc:  # a value the infotext holds that the field cannot take
        error = exc.errors()[0]
        raise refuse(".".join(map(str, error["loc"])), f"from the infotext: {error['msg']}") from None


def _infotext_value(field: RequestField, text: Any) -> Any:
    """An infotext's value as the field's type ("False" is false, as A1111 reads it)."""
    if field.python_type is bool and isinstance(text, str):
        if text.strip().lower() not in ("true", "false"):
            raise ValueError(text)
        return text.strip().lower() == "true"
    return field.python_type(text)


def option_flag(body: _Request, mine: UserOptions, option: str, field: str | None = None, default: bool = False
                ) -> bool:
    """An A1111 on/off setting as A1111 reads it: the request's ``field`` (where it has one), else the
    override's or the user's ``option`` (A1111's p.tiling and opts.tiling, opts.pad_cond_uncond), else A1111's
    ``default``."""
    request = getattr(body, field) if field else None
    for where, value in ((field, request), (f"override_settings.{option}", (body.override_settings or {}).get(
            option)), (f"options.{option}", mine.options.get(option))):
        if value is not None:
            if not isinstance(value, bool):
                raise refuse(where, f"true or false (got {str(value)[:80]!r})")
            return value
    return default


def strip_comments(text: str) -> str:
    """A prompt without its ``#`` comments, as A1111's Comments script leaves it: a line that is all comment,
    then the rest of any line from a ``#``, each becomes a line break."""
    text = re.sub(r"(^|\n)#[^\n]*(\n|$)", "\n", text)
    return re.sub(r"#[^\n]*(\n|$)", "\n", text)


def first_phase(body: "Txt2ImgBody") -> dict[str, int]:
    """A1111's legacy firstphase_width/height: the first pass (the picture, without the hires fix) at that size
    instead of width x height (its __post_init__ swaps them in; the hires target is computed from them after)."""
    if not body.firstphase_width or not body.firstphase_height:
        raise refuse("firstphase_width" if not body.firstphase_width else "firstphase_height",
                     "both firstphase_width and firstphase_height, or neither (A1111 takes both as the first pass's "
                     "size): set width and height instead")
    return {"width": body.firstphase_width, "height": body.firstphase_height}


def hires_sampler(body: "Txt2ImgBody") -> dict[str, str]:
    """A1111's hr_sampler_name and hr_scheduler (its "Use same ..." or nothing: the first pass's) as sdtrt's."""
    settings = {}
    if body.hr_sampler_name not in (None, "", "Use same sampler"):
        settings["hr_sampler"] = sampler_named(body.hr_sampler_name)
    if body.hr_scheduler not in (None, "", "Use same scheduler"):
        settings["hr_schedule_type"] = schedule_named(body.hr_scheduler)
    return settings


def sampler_named(name: str) -> str:
    """sdtrt's sampler for an A1111 sampler name or alias (an unknown one as it is, for the check to name)."""
    return next((s.name for s in SAMPLERS.values() if name in s.aliases), name)


def schedule_named(name: str) -> str:
    """sdtrt's schedule type for A1111's label or its API name ("sgm_uniform")."""
    return SCHEDULER_NAMES.get(name.lower().replace(" ", "_"), name)


def sampler_of(body: _Request) -> str:
    """sdtrt's sampler for A1111's name or alias (sampler_name, else the legacy sampler_index)."""
    return sampler_named(body.sampler_name or body.sampler_index)


def translate(body: _Request, mine: UserOptions, styles: dict, catalog: Catalog) -> dict[str, Any]:
    """sdtrt's settings for A1111's request ``body`` from the user whose options are ``mine``: the keyword
    arguments of Client.txt2img/img2img (the model's own limits are the client's to check)."""
    check_bounds(body)
    body = with_infotext(body)
    settings = {A1111_AS_IS[k]: getattr(body, k) for k in A1111_AS_IS if k in type(body).model_fields}
    if body.styles:
        settings["prompt"], settings["negative_prompt"] = apply_styles(
            body.prompt, body.negative_prompt, [styles[name] for name in body.styles if name in styles])
    if option_flag(body, mine, "enable_prompt_comments", default=True):  # (after styles, as A1111)
        for name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            if isinstance(settings.get(name), str):
                settings[name] = strip_comments(settings[name])
    if settings.get("denoising_strength") is None or (isinstance(body, Txt2ImgBody) and not body.enable_hr):
        settings.pop("denoising_strength")  # (A1111 ignores it for txt2img without hires fix)
    settings["sampler"] = sampler_of(body)
    # A1111's code paths (the A1111-exact mode): every sampler k-diffusion has runs on it as A1111 runs it, DDIM
    # and PLMS on A1111's own timesteps (the others have no such path: the setting changes nothing for them)
    settings["k_diffusion"] = True
    if body.subseed == -1:  # resolved here, so that info can say which one (A1111's all_subseeds)
        settings["subseed"] = random.randint(0, MAX_SEED)
    if body.scheduler is not None:
        settings["schedule_type"] = schedule_named(body.scheduler)
    if isinstance(body, Txt2ImgBody) and body.enable_hr and body.hr_upscaler is not None:
        settings["hr_upscaler"] = body.hr_upscaler
    if isinstance(body, Txt2ImgBody) and body.enable_hr:
        settings.update(hires_sampler(body))
    if isinstance(body, Txt2ImgBody) and (body.firstphase_width or body.firstphase_height):
        settings.update(first_phase(body))
    changes = read_options(body.override_settings or {}, "override_settings", catalog)
    settings["clip_skip"] = changes.clip_skip if changes.clip_skip is not None else mine.clip_skip
    settings["sdxl_clip_l_skip"] = option_flag(body, mine, "sdxl_clip_l_skip")
    settings["randn_source"] = changes.randn_source or mine.randn_source
    settings["model"] = changes.model or catalog.get(mine.model).key
    if catalog.get(settings["model"]).two_text_encoders and not settings["sdxl_clip_l_skip"]:
        settings["clip_skip"] = 1  # A1111 applies Clip skip to SDXL only with that option, to CLIP-L
    settings.update(other_checkpoints(body, catalog))
    settings["tiling"] = option_flag(body, mine, "tiling", "tiling")
    settings["pad_conds"] = option_flag(body, mine, "pad_cond_uncond")
    settings["pad_conds_v0"] = option_flag(body, mine, "pad_cond_uncond_v0")
    vae = changes.vae if changes.vae is not None else mine.options.get("sd_vae")
    if vae not in (None, *OWN_VAE_NAMES):
        settings["vae"] = vae
    settings.update(chosen_options(body, mine))
    settings.update(face_settings(body, mine))
    settings.update(sampler_settings(body, settings["sampler"], {**sampler_options(mine), **changes.sampler}))
    if isinstance(body, Img2ImgBody):
        settings.update(img2img_settings(body))
        settings["img2img_fix_steps"] = option_flag(body, mine, "img2img_fix_steps")
        multiplier = body.initial_noise_multiplier  # null: A1111's option of that name
        settings["initial_noise_multiplier"] = mine.options.get("initial_noise_multiplier", 1.0) \
            if multiplier is None else multiplier
    if option_flag(body, mine, "s_min_uncond_all"):
        settings["s_min_uncond_all"] = True
    return settings


def img2img_settings(body: Img2ImgBody) -> dict[str, Any]:
    """A1111's numbered img2img choices in sdtrt's names (the registry's ``a1111_numbered`` fields: A1111 numbers
    them in the order sdtrt lists them), and its mask blur (one radius, or the larger of its x and y)."""
    settings = {}
    for field in NUMBERED:
        number = getattr(body, field.a1111)
        if not 0 <= number < len(field.choices):
            raise refuse(field.a1111, choice_numbers(field.name))
        settings[field.name] = field.choices[number]
    settings["mask_blur"] = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
    return settings


def flatten(picture: Image.Image, background: str) -> Image.Image:
    """A1111's images.flatten: an RGBA picture's transparency filled with ``background`` (its option
    img2img_background_color), then RGB."""
    if picture.mode == "RGBA":
        filled = Image.new("RGBA", picture.size, background)
        filled.paste(picture, mask=picture)
        picture = filled
    return picture.convert("RGB")


def img2img_pictures(body: Img2ImgBody, max_batch: int, background: str = "#ffffff"
                     ) -> tuple[list[Image.Image], Image.Image | None, Image.Image | None]:
    """The init pictures (one for the whole batch, or one per image of it, as A1111; transparency filled with
    ``background`` as A1111 flattens them), the mask (white: repaint) and the latent mask, decoded within
    sdtrt.contract.pictures' bounds once everything else was checked."""
    most = min(max(body.batch_size, 1), max_batch)
    if len(body.init_images) > most:
        raise refuse("init_images", f"1 to {most} pictures (at most batch_size: A1111 redraws one per image of "
                                    f"the batch), got {len(body.init_images)}")
    try:
        init = [flatten(open_image(data, "init_images"), background) for data in body.init_images]
    except ValueError:  # (a color PIL cannot read)
        raise refuse("options.img2img_background_color",
                     f"a color such as #ffffff (got {background[:80]!r})") from None
    mask = decode_image(body.mask, "mask", "L") if body.mask else None
    if mask is not None and body.inpainting_mask_invert:
        mask = Image.fromarray(255 - np.asarray(mask))
    latent_mask = decode_image(body.latent_mask, "latent_mask", "L") if body.latent_mask else None
    return init, mask, latent_mask


def extras_job(body: ExtrasSingleImageBody, models: tuple[str, ...] = ()) -> ExtrasUpscale:
    """A1111's Extras request as sdtrt's upscale, its fields checked (the picture's size: check_extras_size;
    ``models``: the server's upscaler models)."""
    for name in ("upscaler_1", "upscaler_2"):
        if getattr(body, name) not in EXTRAS_UPSCALERS and getattr(body, name) not in models:
            raise refuse(name, f"one of {', '.join(map(repr, [*EXTRAS_UPSCALERS, *models]))} (got "
                               f"{getattr(body, name)!r:.80})")
    if body.resize_mode not in (0, 1):
        raise refuse("resize_mode", "0 (by upscaling_resize) or 1 (to upscaling_resize_w x upscaling_resize_h)")
    if not 1 <= body.upscaling_resize <= 8:
        raise refuse("upscaling_resize", f"from 1 to 8 (got {body.upscaling_resize:g})")
    for name in ("upscaling_resize_w", "upscaling_resize_h"):
        if not 1 <= getattr(body, name) <= MAX_SIDE:
            raise refuse(name, f"from 1 to {MAX_SIDE} (got {getattr(body, name)})")
    if not 0 <= body.extras_upscaler_2_visibility <= 1:
        raise refuse("extras_upscaler_2_visibility", f"from 0 to 1 (got {body.extras_upscaler_2_visibility:g})")
    if isinstance(body, ExtrasSingleImageBody) and not body.image:
        raise refuse("image", "a base64-encoded picture")
    if isinstance(body, ExtrasBatchBody) and not body.imageList:
        raise refuse("imageList", f"1 to {MAX_EXTRAS_IMAGES} pictures")
    return ExtrasUpscale(body.upscaler_1, body.upscaler_2, body.extras_upscaler_2_visibility, body.resize_mode,
                         body.upscaling_resize, body.upscaling_resize_w, body.upscaling_resize_h, body.upscaling_crop)


def extras_face_steps(body: ExtrasBody, restorers: tuple[str, ...]) -> ExtrasFaces:
    """Extras' GFPGAN and CodeFormer steps, checked (``restorers``: the server's face restorers)."""
    try:
        return ExtrasFaces.checked(body.gfpgan_visibility, body.codeformer_visibility, body.codeformer_weight,
                                   restorers)
    except InvalidRequest as exc:
        raise refuse(exc.field, str(exc)) from None


def check_extras_size(size: tuple[int, int], job: ExtrasUpscale, models: dict[str, int] | None = None) -> None:
    """The upscale's result and every intermediate of a picture of ``size``, bounded before anything is
    allocated (``models``: the upscaler models' scales)."""
    try:
        check_upscale(size, job, models)
    except InvalidRequest as exc:
        raise refuse(exc.field, str(exc)) from None
