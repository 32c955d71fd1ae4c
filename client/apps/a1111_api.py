"""An AUTOMATIC1111-compatible REST gateway (``/sdapi/v1``) in front of a running sdtrt server.

Scripts, bots and plugins written for A1111's API work unchanged: same paths, same request and response JSON
(images as base64 PNG with the infotext inside, ``parameters`` echoed, ``info`` as A1111's JSON string), A1111's
defaults, ``null`` for "the default" as A1111 takes it. As A1111 does, keys it does not know are ignored; unlike
A1111, it says which (``sdtrt_ignored_fields`` in ``info`` and the ``X-Sdtrt-Ignored-Fields`` header). A field
the server cannot honour (face restoration, scripts, refiners, ...) is refused with 422 naming it when its value
would change the picture; a value equal to what sdtrt does anyway is accepted (``eta`` 1 for ancestral samplers,
``s_tmax`` without churn, ``image_cfg_scale`` on a model that is not instruct-pix2pix, ...). It is a thin layer
over :class:`sdtrt.client.Client`; no model code runs here.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import html
import io
import json
import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtrt import __version__
from sdtrt.client.client import Client, JobControl, ServerError, ServerRefused, ServerUnavailable
from sdtrt.contract.errors import DiskFull, InvalidRequest, echo, invalid_field
from sdtrt.client.apps.web_guard import DEFAULT_MAX_BODY, USER_KEY, WebGuard
from sdtrt.contract.spec import IMG2IMG, TXT2IMG
from sdtrt.requests.fields import A1111_AS_IS, A1111_NAMES, FIELDS
from sdtrt.requests.generation import MAX_N_ITER, Generation, check_n_iter
from sdtrt.contract.hires import HIRES_UPSCALERS
from sdtrt.requests.img2img import INPAINTING_FILLS, RESIZE_MODES
from sdtrt.requests.infotext import check_infotext, parse_infotext
from sdtrt.contract.outputs import disk_full_summary, png_info, save_png
from sdtrt.contract.pictures import MAX_PICTURE_BYTES, MAX_PICTURE_PIXELS, open_picture, picture_bytes_from_base64
from sdtrt.contract.prometheus import samples, scrape
from sdtrt.contract.samplers import DEFAULT_RHO, SAMPLERS, SCHEDULE_TYPES
from sdtrt.contract.seeds import MAX_SEED
from sdtrt.requests.styles import apply_styles, load_styles
from sdtrt.requests.upscale import EXTRAS_UPSCALERS, MAX_SIDE, NO_UPSCALER, ExtrasUpscale, check_upscale, extras_upscale

log = logging.getLogger("sdtrt.gateway")

# A1111's scheduler names (its API takes name or label) -> sdtrt schedule types
SCHEDULER_NAMES = {label.lower().replace(" ", "_"): label for label in SCHEDULE_TYPES}  # A1111's names: "sgm_uniform"
RESIZE_MODE_NAMES = list(RESIZE_MODES)  # A1111 numbers them 0, 1, 2 in this order

# A1111 request field -> sdtrt request field, for the fields sdtrt takes as they are (sdtrt.requests.fields)
FIELD_MAP = A1111_AS_IS
# sdtrt request field -> A1111's name, for naming it in a refusal; the pictures travel beside the fields
A1111_NAME = A1111_NAMES | {"init_image": "init_images", "mask": "mask"}
OPTIONS_HONOURED = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "randn_source")
# The /cmd-flags a client may see (A1111's names); the rest (paths, the addresses behind the gateway) stay here.
PUBLIC_FLAGS = ("api", "nowebui", "listen", "port", "api_auth")
# A1111's noise sources -> sdtrt's: its GPU source on an NVIDIA card gives NV's numbers
RANDN_SOURCES = {"CPU": "CPU", "NV": "NV", "GPU": "NV"}
# A1111 options that change the picture, with the values sdtrt draws with; other values are refused by name.
OPTIONS_FIXED = {
    "sd_vae": ("Automatic", "None"), "eta_ancestral": (1, 1.0), "eta_ddim": (0, 0.0), "eta_noise_seed_delta": (0,),
    "img2img_fix_steps": (False,),
}


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
    restore_faces: bool | None = Field(None, description="not supported: refused when true")
    tiling: bool | None = Field(None, description="not supported: refused when true")
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, description="not supported: refused when set")
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = Field(None, description=f"only {', '.join(OPTIONS_HONOURED)}")
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = Field(None, description="fill the settings from an A1111 infotext (fields given win)")


_Request = create_model("_Request", __base__=_RequestBase, __module__=__name__, **as_is_fields(None))


class _Txt2ImgBody(_Request):
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_upscaler: str | None = None
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: str | None = None


Txt2ImgBody = create_model("Txt2ImgBody", __base__=_Txt2ImgBody, __module__=__name__, **as_is_fields(TXT2IMG))


class _Img2ImgBody(_Request):
    init_images: list[str] = Field(..., description="base64 pictures: one for the whole batch, or up to batch_size "
                                   "(one picture each)")
    resize_mode: int = Field(0, description="0 just resize, 1 crop and resize, 2 resize and fill")
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64 mask: white = repaint")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = Field(0, description="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


Img2ImgBody = create_model("Img2ImgBody", __base__=_Img2ImgBody, __module__=__name__, **as_is_fields(IMG2IMG))


class ExtrasSingleImageBody(BaseModel):
    """A1111's Extras on one picture; sdtrt has its upscalers (GET /sdapi/v1/upscalers), no face restoration."""

    model_config = ConfigDict(extra="allow")

    image: str = Field("", description="base64 picture")
    resize_mode: int = Field(0, description="0: upscale by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, description="not supported: refused unless 0")
    codeformer_visibility: float = Field(0.0, description="not supported: refused unless 0")
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = NO_UPSCALER
    upscaler_2: str = NO_UPSCALER
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


# field -> the value(s) it may have; anything else is refused with 422 (the fields whose effect depends on other
# fields are checked in unhonoured() below)
UNSUPPORTED = {
    "restore_faces": (None, False),
    "tiling": (None, False), "s_min_uncond": (None, 0.0), "s_churn": (None, 0.0), "s_noise": (None, 1.0),
    "refiner_checkpoint": (None, "", "None"),
    "refiner_switch_at": (None,), "script_name": (None, ""), "script_args": ([],), "alwayson_scripts": ({},),
    "firstphase_width": (0,), "firstphase_height": (0,), "hr_resize_x": (0,), "hr_resize_y": (0,),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"), "hr_sampler_name": (None, "", "Use same sampler"),
    "hr_scheduler": (None, "", "Use same scheduler"), "hr_prompt": ("",), "hr_negative_prompt": ("",),
    "firstpass_image": (None,), "mask_round": (True,), "initial_noise_multiplier": (None, 1.0), "latent_mask": (None,),
}
def unhonoured(body: "_Request", sampler: str) -> tuple[str, str] | None:
    """A field whose value would make the picture differ from what sdtrt draws: (field, why), else None."""
    eta = SAMPLERS[sampler].eta if sampler in SAMPLERS else None  # (a sampler sdtrt lacks is refused by name later)
    if body.eta is not None and eta is not None and body.eta != eta:
        return "eta", f"sdtrt runs {sampler} with eta {eta:g} (A1111's default); other values are not supported"
    return None

def refuse(field: str, message: str) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def open_image(data: str, field: str) -> Image.Image:
    """A base64 picture (a data: URL too), loaded with its text chunks, within sdtrt.contract.pictures' bounds (size,
    pixels, PNG/JPEG/WebP), checked before it is decoded; a named 422 otherwise."""
    try:
        return open_picture(picture_bytes_from_base64(data, field), field)
    except InvalidRequest as exc:
        raise refuse(field, str(exc)) from None


def decode_image(data: str, field: str, mode: str) -> Image.Image:
    return open_image(data, field).convert(mode)


def encode_png(image: np.ndarray, infotext: str | None = None) -> str:
    pil = Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", pnginfo=png_info(infotext) if infotext else None)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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


@dataclass
class UserOptions:
    """One user's A1111 options. A1111 serves one user, whose options are the server's; sdtrt serves many (each
    set of credentials is a user; without credentials, loopback only, everyone is the one user "")."""

    clip_skip: int = 1
    randn_source: str = "CPU"
    model: str | None = None  # A1111's loaded checkpoint: options.sd_model_checkpoint (None: the default)
    options: dict[str, Any] = field(default_factory=dict)  # A1111 options sdtrt has no use for, kept for GET


class Gateway:
    """The gateway's state: the client, each user's A1111 options, the generations under way."""

    def __init__(self, client: Client, outputs: Path | None = None, styles_file: Path | None = None):
        self.client = client
        self.outputs = outputs
        self.styles_file = styles_file
        self._styles: tuple[float | None, dict] = (None, {})  # (the file's mtime when read, its styles)
        self.lock = threading.Lock()
        self._users: dict[str, UserOptions] = {}  # at most one per set of credentials the gateway was given
        # every generation under way, by (user, task id): what /progress, /interrupt and /skip reach
        self.jobs: dict[tuple[str, str], Job] = {}

    def user(self, name: str) -> UserOptions:
        with self.lock:
            return self._users.setdefault(name, UserOptions())

    def user_jobs(self, user: str) -> list[Job]:
        with self.lock:
            return [job for job in self.jobs.values() if job.user == user]

    # --- translation ---------------------------------------------------------------------------------------
    def styles(self) -> dict:
        """The styles file's styles, read again only when it has changed (an edit shows without a restart)."""
        try:
            mtime = self.styles_file.stat().st_mtime if self.styles_file is not None else None
        except OSError:
            mtime = None
        if mtime != self._styles[0] or mtime is None:
            self._styles = (mtime, load_styles(self.styles_file) if mtime is not None else {})
        return self._styles[1]

    def current(self, user: str = ""):
        return self.client.catalog.get(self.user(user).model)

    def find_model(self, value: Any, where: str) -> str:
        """A1111 names a checkpoint by title, name, file name or hash; sdtrt by its key in the repository."""
        for key, spec in self.client.catalog.models.items():
            if value in (key, spec.title, spec.name, spec.model_hash, f"{spec.name}.safetensors"):
                return key
        titles = ", ".join(repr(spec.title) for spec in self.client.catalog.models.values())
        raise refuse(f"{where}.sd_model_checkpoint", f"not one of this server's models: {titles}")

    def apply_options(self, options: dict[str, Any], where: str) -> tuple[int | None, str | None, str | None]:
        """Check A1111 options; returns the Clip skip, the model and the noise source they set (None if unset).
        Options that would change the picture to something sdtrt does not draw are refused by name; the rest are
        kept (``/options``) or ignored and listed (``override_settings``), as A1111 keeps options it has no use
        for."""
        clip_skip = model = randn_source = None
        for key, value in options.items():
            if key == "sd_model_checkpoint":
                model = self.find_model(value, where)
            elif key == "CLIP_stop_at_last_layers":
                clip_skip = value
            elif key == "randn_source":
                if value not in RANDN_SOURCES:
                    raise refuse(f"{where}.randn_source", f"one of {', '.join(map(repr, RANDN_SOURCES))} (got "
                                                          f"{str(value)[:80]!r})")
                randn_source = RANDN_SOURCES[value]
            elif key in OPTIONS_FIXED and value not in OPTIONS_FIXED[key]:
                allowed = ", ".join(repr(a) for a in OPTIONS_FIXED[key])
                raise refuse(f"{where}.{key}", f"not supported by sdtrt: it draws with {allowed}")
        return clip_skip, model, randn_source

    def ignored_fields(self, body: _Request) -> list[str]:
        """The request's keys that change nothing here: unknown ones, and override_settings sdtrt has no use for."""
        overrides = [f"override_settings.{k}" for k in body.override_settings or {}
                     if k not in OPTIONS_HONOURED and k not in OPTIONS_FIXED]
        known = self.styles()
        styles = [f"styles.{name}" for name in body.styles or [] if name not in known]  # A1111 skips them too
        return body.ignored_fields + overrides + styles

    def check_bounds(self, body: _Request) -> None:
        """What a request asks for, bounded before anything is decoded, parsed or sent (the generation's own
        limits are the model's, checked by the client)."""
        try:
            check_n_iter(body.n_iter)
        except InvalidRequest as exc:
            raise refuse("n_iter", str(exc)) from None
        if body.styles is not None and (len(body.styles) > MAX_STYLES
                                        or any(len(name) > MAX_NAME_CHARS for name in body.styles)):
            raise refuse("styles", f"at most {MAX_STYLES} style names of at most {MAX_NAME_CHARS} characters each "
                                   f"(got {len(body.styles)})")
        if body.force_task_id is not None and len(body.force_task_id) > MAX_NAME_CHARS:
            raise refuse("force_task_id", f"at most {MAX_NAME_CHARS} characters (got {len(body.force_task_id)})")
        if body.infotext is not None:
            try:
                check_infotext(body.infotext)
            except InvalidRequest as exc:
                raise refuse("infotext", str(exc)) from None

    def settings(self, body: _Request, user: str = "") -> dict[str, Any]:
        self.check_bounds(body)
        given = body.model_dump(exclude_unset=True)
        if body.infotext:  # A1111 1.9+: settings from an infotext, explicit fields win
            from sdtrt.requests.generation import settings_from_infotext

            stored = {A1111_NAME.get(k, k): v for k, v in settings_from_infotext(body.infotext).items()}
            if "resize_mode" in stored:  # the infotext says it in words, A1111's API in numbers
                if stored["resize_mode"] not in RESIZE_MODE_NAMES:
                    raise refuse("resize_mode", f"the infotext's Resize mode {str(stored['resize_mode'])[:80]!r} is "
                                                f"not one of {', '.join(RESIZE_MODE_NAMES)}")
                stored["resize_mode"] = RESIZE_MODE_NAMES.index(stored["resize_mode"])
            given = {**{k: v for k, v in stored.items() if k in type(body).model_fields}, **given}
            try:
                body = type(body)(**given)
            except ValidationError as exc:  # a value the infotext holds that the field cannot take
                error = exc.errors()[0]
                raise refuse(".".join(map(str, error["loc"])), f"from the infotext: {error['msg']}") from None
        for field, allowed in UNSUPPORTED.items():
            if field in type(body).model_fields and getattr(body, field) not in allowed:
                raise refuse(field, f"not supported by sdtrt (allowed: {', '.join(repr(a) for a in allowed)})")
        settings = {FIELD_MAP[k]: getattr(body, k) for k in FIELD_MAP if k in type(body).model_fields}
        if body.styles:
            known = self.styles()
            settings["prompt"], settings["negative_prompt"] = apply_styles(
                body.prompt, body.negative_prompt, [known[name] for name in body.styles if name in known])
        if settings.get("denoising_strength") is None or (isinstance(body, Txt2ImgBody) and not body.enable_hr):
            settings.pop("denoising_strength")  # (A1111 ignores it for txt2img without hires fix)
        sampler = body.sampler_name or body.sampler_index
        sampler = next((s.name for s in SAMPLERS.values() if sampler in s.aliases), sampler)
        settings["sampler"] = sampler
        if (problem := unhonoured(body, sampler)) is not None:
            raise refuse(*problem)
        if body.subseed == -1:  # resolved here, so that info can say which one (A1111's all_subseeds)
            settings["subseed"] = random.randint(0, MAX_SEED)
        if body.scheduler is not None:
            settings["schedule_type"] = SCHEDULER_NAMES.get(body.scheduler.lower().replace(" ", "_"), body.scheduler)
        if isinstance(body, Txt2ImgBody) and body.enable_hr and body.hr_upscaler is not None:
            settings["hr_upscaler"] = body.hr_upscaler
        clip_skip, model, randn_source = self.apply_options(body.override_settings or {}, "override_settings")
        mine = self.user(user)
        settings["clip_skip"] = clip_skip if clip_skip is not None else mine.clip_skip
        settings["randn_source"] = randn_source or mine.randn_source
        settings["model"] = model or self.current(user).key
        if isinstance(body, Img2ImgBody):
            if not 0 <= body.resize_mode < len(RESIZE_MODE_NAMES):
                raise refuse("resize_mode", "0 (just resize), 1 (crop and resize) or 2 (resize and fill)")
            settings["resize_mode"] = RESIZE_MODE_NAMES[body.resize_mode]
            if not 0 <= body.inpainting_fill < len(INPAINTING_FILLS):
                raise refuse("inpainting_fill", "0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
            settings["inpainting_fill"] = INPAINTING_FILLS[body.inpainting_fill]  # A1111 numbers them in this order
            settings["mask_blur"] = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x,
                                                                                         body.mask_blur_y)
        return settings

    # --- jobs ----------------------------------------------------------------------------------------------
    def claim(self, kind: str, body: _Request, user: str = "") -> Job:
        """Register a generation before it waits for a thread (it shows in /progress as queued, and /interrupt
        reaches it). The server sees a fresh random id (its progress model answers whoever names one); A1111's
        task id, which a client may choose, only names the job here, among its own user's jobs."""
        job = Job(JobControl(), user, body.force_task_id or uuid.uuid4().hex, kind, body.n_iter, time.time(),
                  time.strftime("%Y%m%d%H%M%S"))
        with self.lock:
            if (user, job.task_id) in self.jobs:  # one id, one job: a second would hide the first
                raise HTTPException(409, detail=f"force_task_id {echo(job.task_id)} names a generation of yours "
                                                "that is still running: choose another id, or wait for it")
            self.jobs[(user, job.task_id)] = job
        return job

    def release(self, job: Job) -> None:
        with self.lock:
            if self.jobs.get((job.user, job.task_id)) is job:
                del self.jobs[(job.user, job.task_id)]

    def run(self, kind: str, body: _Request, call, user: str = "", settings: dict[str, Any] | None = None,
            job: Job | None = None) -> dict[str, Any]:
        """One generation: ``job`` claimed beforehand (claim), or claimed here; released when it ends."""
        job = job or self.claim(kind, body, user)
        try:
            return self._run(kind, body, call, user, settings, job)
        finally:
            self.release(job)

    def _run(self, kind: str, body: _Request, call, user: str, settings: dict[str, Any] | None,
             job: Job) -> dict[str, Any]:
        settings = self.settings(body, user) if settings is None else settings

        def progress(done: int, total: int) -> None:
            job.done = done

        try:
            result: Generation = call(dict(settings), progress, job.control)  # (img2img pops the prompt)
        except InvalidRequest as exc:
            raise refuse(A1111_NAME.get(exc.field, exc.field), str(exc)) from None
        except ServerRefused as exc:  # a check only the server could make: its words, as the gateway's own
            field = invalid_field(str(exc)) or "request"
            raise refuse(A1111_NAME.get(field, field), str(exc)) from None
        except ServerUnavailable as exc:
            raise HTTPException(503, detail=str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        except ServerError as exc:
            raise HTTPException(502, detail=f"the sdtrt server failed (error {logged(exc)}; the gateway's log has "
                                            "the details): try again, and tell its operator if it persists") from None
        if body.save_images and self.outputs is not None:
            try:
                for image, seed, info in zip(result.images, result.seeds, result.infotexts):
                    save_png(image, seed, info, self.outputs / f"{kind}-images")
            except DiskFull as exc:  # nothing partial is left (sdtrt.contract.files); the client learns what filled
                logged(exc)
                raise HTTPException(507, detail=f"the gateway's output folder ({kind}-images) is full: "
                                                f"{disk_full_summary(exc)}. Send the request with save_images "
                                                "false, or have the operator free space") from None
        parameters = body.model_dump()
        parameters.pop("init_images", None)
        parameters.pop("mask", None)
        return {
            "images": [encode_png(im, info) for im, info in zip(result.images, result.infotexts)]
            if body.send_images else [],
            "parameters": parameters,
            "info": json.dumps(self.info(body, settings, result, job)),
        }

    def info(self, body: _Request, settings: dict[str, Any], result: Generation, job: "Job") -> dict[str, Any]:
        spec = self.client.catalog.get(settings["model"])
        vae = spec.extra.get("vae") or {}
        return {
            "prompt": settings["prompt"], "all_prompts": [settings["prompt"]] * len(result.seeds),
            "negative_prompt": settings["negative_prompt"],
            "all_negative_prompts": [settings["negative_prompt"]] * len(result.seeds),
            "seed": result.seeds[0] if result.seeds else settings["seed"], "all_seeds": result.seeds,
            "subseed": settings["subseed"], "all_subseeds": [settings["subseed"] + i for i in range(len(result.seeds))],
            "subseed_strength": body.subseed_strength, "width": body.width, "height": body.height,
            "sampler_name": settings["sampler"], "cfg_scale": body.cfg_scale, "steps": body.steps,
            "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": spec.name or spec.model_name, "sd_model_hash": spec.model_hash, "sd_vae_name": vae.get("name"),
            "sd_vae_hash": vae.get("sha256", "")[:10] or None, "seed_resize_from_w": body.seed_resize_from_w,
            "seed_resize_from_h": body.seed_resize_from_h,
            "denoising_strength": settings.get("denoising_strength"), "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": result.infotexts, "styles": body.styles or [],
            "job_timestamp": job.timestamp, "clip_skip": settings["clip_skip"],
            "is_using_inpainting_conditioning": False, "version": f"sdtrt {__version__}",
            "sdtrt_ignored_fields": self.ignored_fields(body),
        }


# Control routes (progress, interrupt, skip, options, health) run on threads of their own, never on the pool that
# runs generations: with every generation slot busy, an interrupt still gets through at once.
CONTROL_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gateway-control")
DISCONNECT_POLL_S = 0.5


def control_route(fn):
    """A route's sync body run on CONTROL_POOL (FastAPI reads the parameters from ``fn``'s signature)."""
    @functools.wraps(fn)
    async def route(*args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(CONTROL_POOL, functools.partial(fn, *args, **kwargs))
    return route


async def until_disconnected(request: Request, job: "Job", limiter: "anyio.CapacityLimiter", work, release):
    """Run ``work`` (the generation ``job``) on one of ``limiter``'s generation threads; if the client goes away
    before it is done (waiting for a thread included), interrupt the job (the server's loops stop within a step)
    instead of finishing work nobody will receive. The job is released however it ends."""
    try:
        task = asyncio.ensure_future(anyio.to_thread.run_sync(work, limiter=limiter))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                log.warning("client went away: interrupting its generation (request %s)", job.control.request_id)
                job.control.interrupt()
                break
        return await task
    finally:
        release(job)


def current_user(request: Request) -> str:
    """The user the front door (WebGuard) let in: their credentials' name, "" without credentials."""
    return request.scope.get(USER_KEY, "")


def logged(exc: BaseException) -> str:
    """Log a failure with its details under a fresh id and return the id: what the client is told instead of the
    details (paths, hosts and internals stay in the gateway's log)."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
    return error_id


def a1111_error(status: int, name: str, detail: Any, message: str, headers: dict[str, str] | None = None):
    """A1111's error body: the exception's type, its detail, and its text."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": name, "detail": detail, "body": "", "errors": message})


def server_memory(metrics_url: str | None) -> dict[str, Any]:
    """A1111's /memory from the Triton server's own metrics (its host's RAM, its GPUs' memory): the gateway's
    process is not where the models run."""
    if not metrics_url:
        return {"ram": {"error": "no --metrics-url"}, "cuda": {"error": "no --metrics-url"}}
    try:
        text = scrape(metrics_url)
    except OSError as exc:
        message = f"the server's metrics could not be read (error {logged(exc)})"  # its address stays in the log
        return {"ram": {"error": message}, "cuda": {"error": message}}
    values: dict[str, float] = {}
    for name, _, value in samples(text):
        values[name] = values.get(name, 0.0) + value  # GPUs summed

    def usage(prefix: str) -> dict[str, Any]:
        total, used = values.get(f"{prefix}_total_bytes"), values.get(f"{prefix}_used_bytes")
        if total is None or used is None:
            return {"error": "unavailable"}
        return {"free": total - used, "used": used, "total": total}

    gpu = usage("nv_gpu_memory")
    return {"ram": usage("nv_cpu_memory"), "cuda": gpu if "error" in gpu else {"system": gpu}}


def create_app(client: Client, outputs: Path | None = None, auth: dict[str, str] | None = None, *,
               styles_file: Path | None = None, metrics_url: str | None = None,
               flags: dict[str, Any] | None = None, max_body: int = DEFAULT_MAX_BODY,
               max_generations: int = 32) -> FastAPI:
    """The gateway over ``client``; with ``auth`` (user -> password) every route wants HTTP basic auth, its
    documentation included, and each user sees and stops only their own generations. ``styles_file`` is A1111's
    styles.csv, ``metrics_url`` the server's Prometheus metrics (for /memory), ``flags`` what /cmd-flags answers
    (the command's flags, passwords and internal addresses left out), ``max_body`` the largest request body."""
    gateway = Gateway(client, outputs, styles_file)
    generations = anyio.CapacityLimiter(max_generations)  # the generation threads; control routes have CONTROL_POOL
    app = FastAPI(title="sdtrt: AUTOMATIC1111-compatible API", version=__version__,
                  description="The A1111 /sdapi/v1 endpoints a Stable Diffusion server can honour, served by sdtrt.")
    app.add_middleware(WebGuard, users=auth, max_body=max_body)

    @app.exception_handler(InvalidRequest)
    async def invalid(_, exc: InvalidRequest):
        detail = [{"loc": ["body", A1111_NAME.get(exc.field, exc.field)], "msg": str(exc), "type": "value_error"}]
        return a1111_error(422, "InvalidRequest", detail, str(exc))

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and the router's own (404, 405)
    async def http_error(_, exc: StarletteHTTPException):
        return a1111_error(exc.status_code, "HTTPException", exc.detail, str(exc.detail)[:1000], exc.headers)

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception):
        error_id = logged(exc)
        return a1111_error(500, "InternalError", "", f"internal error {error_id}: the gateway's log has the details")

    def ignored(body: _Request, response: Response) -> None:
        if fields := gateway.ignored_fields(body):
            response.headers["X-Sdtrt-Ignored-Fields"] = ",".join(fields)[:2000]

    @app.post("/sdapi/v1/txt2img", tags=["generation"])
    async def txt2img(body: Txt2ImgBody, response: Response, request: Request,
                      user: str = Depends(current_user)) -> dict[str, Any]:
        ignored(body, response)
        job = gateway.claim("txt2img", body, user)
        return await until_disconnected(request, job, generations, lambda: gateway.run(
            "txt2img", body, lambda s, progress, control: client.txt2img(
                n_iter=body.n_iter, progress=progress, control=control, **s), user, job=job), gateway.release)

    @app.post("/sdapi/v1/img2img", tags=["generation"])
    async def img2img(body: Img2ImgBody, response: Response, request: Request,
                      user: str = Depends(current_user)) -> dict[str, Any]:
        ignored(body, response)
        job = gateway.claim("img2img", body, user)
        return await until_disconnected(request, job, generations, lambda: run_img2img(body, user, job),
                                        gateway.release)

    def run_img2img(body: Img2ImgBody, user: str, job: Job) -> dict[str, Any]:
        if not body.init_images:
            raise refuse("init_images", "at least one picture")
        settings = gateway.settings(body, user)  # every bound checked before a picture is decoded
        most = min(max(body.batch_size, 1), client.catalog.get(settings["model"]).field("batch_size").maximum)
        if len(body.init_images) > most:
            raise refuse("init_images", f"1 to {most} pictures (at most batch_size: A1111 redraws one per image of "
                                        f"the batch), got {len(body.init_images)}")
        # several: one picture per init image, as A1111
        init = [decode_image(data, "init_images", "RGB") for data in body.init_images]
        mask = decode_image(body.mask, "mask", "L") if body.mask else None
        if mask is not None and body.inpainting_mask_invert:
            mask = Image.fromarray(255 - np.asarray(mask))
        return gateway.run("img2img", body, lambda s, progress, control: client.img2img(
            s.pop("prompt"), init, mask, n_iter=body.n_iter, progress=progress, control=control, **s), user, settings,
            job=job)

    @app.get("/sdapi/v1/samplers", tags=["info"])
    def samplers() -> list[dict[str, Any]]:
        return [{"name": name, "aliases": list(s.aliases), "options": {}} for name, s in SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers", tags=["info"])
    def schedulers() -> list[dict[str, Any]]:
        names = {label: name for name, label in SCHEDULER_NAMES.items()}
        return [{"name": names[label], "label": label, "aliases": None, "default_rho": DEFAULT_RHO.get(label, -1),
                 "need_inner_model": label in ("Uniform", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta")}
                for label in SCHEDULE_TYPES]

    @app.get("/sdapi/v1/latent-upscale-modes", tags=["info"])
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": name} for name, u in HIRES_UPSCALERS.items() if u.latent_mode]

    @app.get("/sdapi/v1/upscalers", tags=["info"])
    def upscalers() -> list[dict[str, Any]]:
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name, u in HIRES_UPSCALERS.items() if not u.latent_mode]

    @app.get("/sdapi/v1/sd-models", tags=["info"])
    def sd_models() -> list[dict[str, Any]]:
        """The server's models; ``filename`` is the checkpoint's file name (A1111 gives its path on the server's
        disk, which is nobody's business outside it)."""
        return [{"title": spec.title, "model_name": spec.name or spec.model_name, "hash": spec.model_hash,
                 "sha256": spec.source_hash, "filename": Path(spec.source).name, "config": None}
                for spec in client.catalog.models.values()]

    @app.get("/sdapi/v1/loras", tags=["info"])
    def loras(user: str = Depends(current_user)) -> list[dict[str, Any]]:
        """The current model's registered LoRAs (`sdtrt export --loras DIR`), as A1111's Lora extension lists them
        (``path``: the file's name); a prompt uses one with <lora:name:weight>."""
        return [{"name": name, "alias": name, "path": Path(entry.get("source", entry["file"])).name,
                 "metadata": {"sshs_model_hash": entry["hash"], "rank": entry["rank"]}}
                for name, entry in gateway.current(user).loras.items()]

    @app.get("/sdapi/v1/embeddings", tags=["info"])
    def embeddings(user: str = Depends(current_user)) -> dict[str, Any]:
        spec = gateway.current(user)
        return {"loaded": {name: {"step": None, "sd_checkpoint": spec.model_hash, "sd_checkpoint_name": spec.title,
                                  "shape": spec.text_hidden_size, "vectors": entry["vectors"]}
                           for name, entry in spec.embeddings.items()},
                "skipped": {}}

    @app.post("/sdapi/v1/refresh-loras", tags=["options"])
    def refresh_loras() -> None:
        client.refresh()  # what the server's catalog registers now

    @app.post("/sdapi/v1/refresh-embeddings", tags=["options"])
    def refresh_embeddings() -> None:
        client.refresh()

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["options"])
    def refresh_checkpoints() -> None:
        client.refresh()  # the server's models, as its txt2img model now lists them

    @app.post("/sdapi/v1/interrupt", tags=["generation"])
    @control_route
    def interrupt(user: str = Depends(current_user)) -> None:
        """Stop the caller's generations under way (the server's loops stop within a step); each answers with the
        batches it had finished, as A1111's Interrupt. Other users' generations go on."""
        for job in gateway.user_jobs(user):
            job.control.interrupt()

    @app.post("/sdapi/v1/skip", tags=["generation"])
    @control_route
    def skip(user: str = Depends(current_user)) -> None:
        """Drop the batch each of the caller's generations is running now and go on with its next (A1111's Skip)."""
        for job in gateway.user_jobs(user):
            job.control.skip()

    @app.post("/sdapi/v1/png-info", tags=["info"])
    def png_info_endpoint(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        """A1111's PNG Info: the infotext a picture carries, its other text chunks, and the infotext read into
        A1111's fields (``Size-1``/``Size-2`` for ``Size``, as A1111 splits it)."""
        if not isinstance(body.get("image"), str) or not body["image"]:
            raise refuse("image", "a base64-encoded PNG")
        chunks = {k: v for k, v in open_image(body["image"], "image").info.items() if isinstance(v, str)}
        info = chunks.pop("parameters", "")
        parameters: dict[str, Any] = {}
        try:
            check_infotext(info, "image")
        except InvalidRequest as exc:
            raise refuse("image", f"its parameters text: {exc}") from None
        if info:
            prompt, negative, params = parse_infotext(info)
            parameters = {"Prompt": prompt, "Negative prompt": negative, **params}
            if "x" in params.get("Size", ""):
                parameters["Size-1"], parameters["Size-2"] = params["Size"].split("x", 1)
        return {"info": info, "items": chunks, "parameters": parameters}

    @app.get("/sdapi/v1/sd-vae", tags=["info"])
    def sd_vae() -> list[dict[str, Any]]:
        """The VAEs the server's models were exported with (``--vae``); each is part of its model's export."""
        vaes = {}
        for spec in client.catalog.models.values():
            vae = spec.extra.get("vae") or {}
            if vae.get("name"):
                vaes[vae["name"]] = {"model_name": vae["name"], "filename": vae.get("file") or vae["name"]}
        return list(vaes.values())

    # What sdtrt has none of, said as A1111 says it: empty lists (clients that list them before use keep working).
    for path in ("hypernetworks", "face-restorers", "realesrgan-models", "script-info", "extensions"):
        app.add_api_route(f"/sdapi/v1/{path}", lambda: [], methods=["GET"], tags=["info"])

    @app.get("/sdapi/v1/scripts", tags=["info"])
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/refresh-vae", tags=["options"])
    def refresh_vae() -> None:
        client.refresh()

    @app.get("/sdapi/v1/prompt-styles", tags=["info"])
    def prompt_styles() -> list[dict[str, str]]:
        """The styles in A1111's styles.csv (``--styles-file``), read afresh on each call."""
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in gateway.styles().values()]

    @app.get("/sdapi/v1/memory", tags=["info"])
    def memory() -> dict[str, Any]:
        return server_memory(metrics_url)

    @app.get("/sdapi/v1/cmd-flags", tags=["info"])
    def cmd_flags() -> dict[str, Any]:
        """The gateway's flags as A1111 names them; credentials, paths and the addresses of the servers behind it
        are left out (they say nothing a client needs and something an attacker wants)."""
        return {k: v for k, v in (flags or {}).items() if k in PUBLIC_FLAGS}

    @app.post("/sdapi/v1/extra-single-image", tags=["generation"])
    def extra_single_image(body: ExtrasSingleImageBody, response: Response) -> dict[str, Any]:
        """A1111's Extras upscale with sdtrt's upscalers; the picture's infotext is kept and A1111's
        ``postprocessing`` text says what was done."""
        if body.model_extra:
            response.headers["X-Sdtrt-Ignored-Fields"] = ",".join(sorted(body.model_extra))[:2000]
        for field in ("gfpgan_visibility", "codeformer_visibility"):
            if getattr(body, field) != 0:
                raise refuse(field, "face restoration is not available in sdtrt: 0 only")
        for field in ("upscaler_1", "upscaler_2"):
            if getattr(body, field) not in EXTRAS_UPSCALERS:
                raise refuse(field, f"one of {', '.join(map(repr, EXTRAS_UPSCALERS))} (got {getattr(body, field)!r:.80})")
        if body.resize_mode not in (0, 1):
            raise refuse("resize_mode", "0 (by upscaling_resize) or 1 (to upscaling_resize_w x upscaling_resize_h)")
        if not 1 <= body.upscaling_resize <= 8:
            raise refuse("upscaling_resize", f"from 1 to 8 (got {body.upscaling_resize:g})")
        for field in ("upscaling_resize_w", "upscaling_resize_h"):
            if not 1 <= getattr(body, field) <= MAX_SIDE:
                raise refuse(field, f"from 1 to {MAX_SIDE} (got {getattr(body, field)})")
        if not 0 <= body.extras_upscaler_2_visibility <= 1:
            raise refuse("extras_upscaler_2_visibility", f"from 0 to 1 (got {body.extras_upscaler_2_visibility:g})")
        if not body.image:
            raise refuse("image", "a base64-encoded picture")
        picture = open_image(body.image, "image")
        chunks = {k: v for k, v in picture.info.items() if isinstance(k, str) and isinstance(v, str)}
        job = ExtrasUpscale(body.upscaler_1, body.upscaler_2, body.extras_upscaler_2_visibility, body.resize_mode,
                            body.upscaling_resize, body.upscaling_resize_w, body.upscaling_resize_h,
                            body.upscaling_crop)
        try:
            check_upscale(picture.size, job)  # the result and every intermediate, before anything is allocated
        except InvalidRequest as exc:
            raise refuse(exc.field, str(exc)) from None
        result, info = extras_upscale(picture.convert("RGB"), job)
        text = ", ".join(f"{k}: {v}" for k, v in info.items())
        if text:
            chunks["postprocessing"] = text
        buffer = io.BytesIO()
        pnginfo = PngInfo()
        for key, value in chunks.items():
            pnginfo.add_text(key, value)
        result.save(buffer, format="PNG", pnginfo=pnginfo)
        return {"html_info": f"<p>{html.escape(text)}</p>" if text else "",
                "image": base64.b64encode(buffer.getvalue()).decode("ascii") if body.show_extras_results else None}

    @app.get("/sdapi/v1/options", tags=["options"])
    @control_route
    def get_options(user: str = Depends(current_user)) -> dict[str, Any]:
        """The caller's options (each user has their own; A1111's are its one user's)."""
        mine, spec = gateway.user(user), gateway.current(user)
        return {**mine.options, "sd_model_checkpoint": spec.title,
                "sd_checkpoint_hash": spec.source_hash, "CLIP_stop_at_last_layers": mine.clip_skip,
                "samples_format": "png", "enable_pnginfo": True, "sd_vae": "Automatic", "eta_ancestral": 1.0,
                "eta_ddim": 0.0, "eta_noise_seed_delta": 0, "randn_source": mine.randn_source,
                "img2img_fix_steps": False}

    @app.post("/sdapi/v1/options", tags=["options"])
    @control_route
    def set_options(options: dict[str, Any] = Body(...), user: str = Depends(current_user)) -> None:
        mine = gateway.user(user)
        kept = {**mine.options, **{k: v for k, v in options.items()
                                   if k not in OPTIONS_HONOURED and k not in OPTIONS_FIXED}}
        if len(kept) > MAX_OPTIONS or len(json.dumps(kept, default=str)) > MAX_OPTIONS_BYTES:
            raise refuse("options", f"at most {MAX_OPTIONS} options of {MAX_OPTIONS_BYTES // 1024} kB in all are "
                                    "kept per user")
        clip_skip, model, randn_source = gateway.apply_options(options, "options")
        if clip_skip is not None:
            field = gateway.current(user).field("clip_skip")
            if not isinstance(clip_skip, int) or not field.minimum <= clip_skip <= field.maximum:
                raise refuse("options.CLIP_stop_at_last_layers", f"must be {field.allowed()}")
            mine.clip_skip = clip_skip
        if randn_source is not None:
            mine.randn_source = randn_source
        if model is not None:
            mine.model = model
        # kept and given back, as A1111 keeps every option (read-only ones are answered from the server)
        mine.options = kept

    @app.get("/sdapi/v1/progress", tags=["info"])
    @control_route
    def progress(skip_current_image: bool = False, id_task: str | None = None,
                 user: str = Depends(current_user)) -> dict[str, Any]:
        """A1111's progress of the caller's generation under way, step by step (the server's loop posts its
        steps). With several at once: the latest one, or the one ``id_task`` names (the ``force_task_id`` it was
        sent with). Other users' generations are not shown."""
        with gateway.lock:
            job = gateway.jobs.get((user, id_task)) if id_task else next(
                (j for j in reversed(gateway.jobs.values()) if j.user == user), None)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                              "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                              "sampling_steps": 0}}
        try:
            latest = client.progress(job.control.request_id)
        except ServerError:  # the job ended (its connection closed) between the lookup and the question
            latest = None
        step, total = (latest.step, latest.total) if latest is not None else (0, 0)
        preview = None if skip_current_image or latest is None else latest.preview
        done = min(1.0, (job.done + (step / total if total else 0.0)) / max(job.count, 1))
        elapsed = time.time() - job.started
        return {
            "progress": done,
            "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
            "state": {"skipped": False, "interrupted": job.control.interrupted, "stopping_generation": False,
                      "job": job.kind, "job_count": job.count, "job_timestamp": job.timestamp, "job_no": job.done,
                      "sampling_step": step, "sampling_steps": total},
            "current_image": None if preview is None else encode_png(preview),
            "textinfo": f"batch {job.done + 1} of {job.count}, step {step} of {total}",
        }

    @app.get("/healthz", tags=["info"])
    @control_route
    def healthz() -> JSONResponse:
        """Whether the gateway can serve: 200 when its Triton server answers ready, else 503. Open to anyone
        (Kubernetes' probes): it says nothing but that."""
        ready = client.is_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    return app
