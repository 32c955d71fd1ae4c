"""The Gradio page: A1111's txt2img, img2img (with inpainting) and PNG Info tabs, a thin form over
:class:`sdtrt.client.Client` (no model code here).

Controls, their ranges and defaults come from the served model's spec, so the page offers what the server
takes. While a generation runs, the page follows it step by step from the server's ``progress`` model (a
progress bar and the live preview the job loop posts), and Interrupt / Skip reach it through its JobControl.
Generated PNGs carry the A1111 infotext and are saved under outputs/txt2img-images/ (img2img-images/), as A1111 does.

Nothing the browser sends is trusted (a client can speak Gradio's HTTP API directly): the infotext a gallery click
shows is the one kept on the server for that session, PNG Info reads only a file in Gradio's upload folder and
decodes it within :mod:`sdtrt.contract.pictures`' bounds, the img2img picture's size is bounded, model titles, styles and
numbers are checked against what the page offers, and :class:`PageGuard` stands in front of every route (the
login on all of them, cross-site requests refused, a ceiling on request bodies). The outputs folder itself is not
served: the gallery's pictures are handed to Gradio, which serves its own copies under unguessable names.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import numpy as np
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import asyncio

import gradio as gr  # noqa: E402  (after the variable: gradio reads it on import)
from gradio.utils import get_upload_folder  # noqa: E402  (where Gradio keeps uploads and the files it serves)
from starlette.middleware import Middleware

from sdtrt.client.apps.web_guard import HEALTH_PATH, cross_site, server_failure
from sdtrt.client.apps.web_guard import header as _header
from sdtrt.client.client import Client, JobControl, Progress, ServerError, ServerRefused
from sdtrt.contract.errors import DiskFull, InvalidRequest, SdtrtError, echo
from sdtrt.contract.outputs import disk_full_summary, save_png
from sdtrt.contract.spec import CLIP_INTERROGATOR
from sdtrt.contract.pictures import MAX_PICTURE_BYTES, MAX_PICTURE_PIXELS, open_picture, restrict_pillow
from sdtrt.requests.controlnet import CONTROL_MODES
from sdtrt.requests.controlnet import RESIZE_MODES as CONTROLNET_RESIZE_MODES
from sdtrt.requests.preprocessors import PREPROCESSORS
from sdtrt.requests.fields import LABELS, tab_fields
from sdtrt.requests.generation import Generation, settings_from_infotext
from sdtrt.requests.styles import DEFAULT_STYLES_FILE, apply_styles, load_styles
from sdtrt.postprocessing.faces import ExtrasFaces, extras_faces
from sdtrt.postprocessing.interrogate import DEEPBOORU
from sdtrt.postprocessing.upscale import EXTRAS_UPSCALERS, ExtrasUpscale, ModelUpscalers, extras_upscale

log = logging.getLogger("sdtrt.page")

TITLE = "sdtrt: Stable Diffusion on Triton"
POLL_SECONDS = 0.3  # how often a running generation's progress is read from the server
INPAINT_AREAS = {"Whole picture": False, "Only masked": True}  # A1111's radio for inpaint_full_res
MAX_BATCH_COUNT = 100  # the Batch count slider's maximum (A1111's), checked again by the handlers
# Gradio refuses an uploaded file beyond this (its max_file_size): room for a picture within MAX_PICTURE_BYTES and
# for the PNGs the img2img canvas makes of it (a large photo's lossless layers can outgrow the JPEG it came from).
MAX_UPLOAD_BYTES = 2 * MAX_PICTURE_BYTES
PAGE_MAX_BODY = MAX_UPLOAD_BYTES + 2**20  # any one request to the page (an upload plus its multipart framing)


class PageJobs:
    """The generations under way, per browser session: what that session's Interrupt and Skip reach."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_session: dict[str, JobControl] = {}

    def start(self, session: str) -> JobControl:
        control = JobControl()
        with self._lock:
            self._by_session[session] = control
        return control

    def end(self, session: str, control: JobControl) -> None:
        with self._lock:
            if self._by_session.get(session) is control:
                del self._by_session[session]

    def interrupt(self, session: str) -> None:
        with self._lock:
            control = self._by_session.get(session)
        if control is not None:
            control.interrupt()

    def skip(self, session: str) -> None:
        with self._lock:
            control = self._by_session.get(session)
        if control is not None:
            control.skip()


@dataclass
class Followed:
    """A generation run in a thread while the page follows its progress."""

    control: JobControl
    n_iter: int
    batches: int = 0  # finished
    result: Generation | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


def follow(client: Client, state: Followed,
           work: Callable[[Callable[[int, int], None]], Generation]) -> Iterator[Progress | None]:
    """Run ``work(on_batch)`` in a thread; yield the server's latest progress for it every POLL_SECONDS while it
    runs. When the generator ends, ``state`` holds its result or error."""

    def on_batch(done: int, _total: int) -> None:
        state.batches = done

    def target() -> None:
        try:
            state.result = work(on_batch)
        except BaseException as exc:  # handed to the page's thread, which shows it
            state.error = exc

    state.thread = threading.Thread(target=target, daemon=True, name="sdtrt-page-job")
    state.thread.start()
    while True:
        state.thread.join(POLL_SECONDS)
        if not state.thread.is_alive():
            return
        try:
            latest = client.progress(state.control.request_id)
        except ServerError:
            latest = None
        yield latest


def progress_html(state: Followed, latest: Progress | None) -> str:
    """A1111's progress bar: the batches done plus the running batch's steps, and a line saying which."""
    if state.thread is not None and not state.thread.is_alive():
        kept = len(state.result.images) if state.result is not None else 0
        if state.control.interrupted:
            text, fraction = f"Interrupted: {kept} image{'s' * (kept != 1)} kept", 1.0
        elif state.error is not None:
            text, fraction = "Failed", 1.0
        else:
            text, fraction = f"Done: {kept} image{'s' * (kept != 1)} in {state.n_iter} batch{'es' * (state.n_iter != 1)}", 1.0
    elif latest is None:
        text, fraction = f"Waiting for the server (batch {state.batches + 1} of {state.n_iter})", state.batches / state.n_iter
    else:
        within = latest.step / latest.total if latest.total else 0.0
        fraction = min(1.0, (state.batches + within) / state.n_iter)
        text = f"Batch {state.batches + 1} of {state.n_iter}, step {latest.step} of {latest.total}"
    return (f'<div class="sdtrt-progress" data-fraction="{fraction:.3f}">'
            f'<div class="sdtrt-progress-bar" style="width:{100 * fraction:.1f}%"></div>'
            f'<span class="sdtrt-progress-text">{html.escape(text)}</span></div>')


PROGRESS_CSS = """
.sdtrt-progress {position: relative; height: 1.6em; border-radius: 4px; background: var(--neutral-200); overflow: hidden}
.sdtrt-progress-bar {position: absolute; inset: 0 auto 0 0; background: var(--color-accent); opacity: .55}
.sdtrt-progress-text {position: relative; padding-left: .5em; line-height: 1.6em; font-size: .9em}
"""


def _typed(spec, name: str, value: Any) -> Any:
    """A control's value as its request field's type (sliders give floats; the radios give their labels)."""
    if name == "inpaint_full_res":
        if value not in INPAINT_AREAS:
            raise InvalidRequest(name, value, f"one of {', '.join(INPAINT_AREAS)}")
        return INPAINT_AREAS[value]
    dtype = spec.field(name).dtype
    try:
        if dtype.startswith("int"):
            return int(value)
        if dtype.startswith("float"):
            return float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(name, value, "a number") from None
    return value


def _whole(value: Any, name: str, lo: int, hi: int, label: str) -> int:
    """A count the browser sent (a slider's value), checked here: Gradio's own check is the component's, and a
    handler must not start work on a number only a slider's maximum stood in front of."""
    what = f"a whole number from {lo} to {hi} ({label})"
    if isinstance(value, bool):
        raise InvalidRequest(name, value, what)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(name, value, what) from None
    if not lo <= number <= hi or number != int(number):  # NaN fails the range too
        raise InvalidRequest(name, value, what)
    return int(number)


def _control(spec, name: str, **kw):
    """The control for one request field, from the served model's spec."""
    f = spec.field(name)
    label = LABELS.get(name, name)
    if name == "inpaint_full_res":
        return gr.Radio(list(INPAINT_AREAS), value="Only masked" if f.default else "Whole picture", label=label, **kw)
    if name in ("resize_mode", "inpainting_fill"):  # radios, as A1111 shows them
        return gr.Radio(list(f.choices), value=f.default, label=label, **kw)
    if f.choices is not None:
        return gr.Dropdown(choices=list(f.choices), value=f.default, label=label, **kw)
    if f.dtype == "bool":
        return gr.Checkbox(value=bool(f.default), label=label, **kw)
    if name in ("seed", "subseed"):
        return gr.Number(value=f.default, label=label, precision=0, minimum=f.minimum, **kw)
    if f.dtype == "string":  # free text (the hires pass's prompts)
        return gr.Textbox(value=f.default, label=label, lines=2, max_length=f.max_length, **kw)
    if f.minimum is not None and f.minimum == f.maximum:  # one allowed value (e.g. Clip skip of a one-layer encoder)
        return gr.Number(value=f.default, label=label, interactive=False, **kw)
    step = f.multiple_of or (0.01 if f.dtype.startswith("float") else 1)
    if name == "guidance_scale":
        step = 0.5
    return gr.Slider(minimum=f.minimum, maximum=f.maximum, value=f.default, step=step, label=label, **kw)


@dataclass
class Tab:
    """One generation tab's controls."""

    prompt: Any
    negative: Any
    styles: Any
    n_iter: Any
    fields: dict[str, Any]
    generate: Any
    interrupt: Any
    skip: Any
    gallery: Any
    preview: Any
    progress: Any
    info: Any
    last_seeds: Any
    infotexts: Any  # the last result's infotexts, kept on the server: what a gallery click shows
    picture: Any = None  # img2img: the picture, with the inpainting mask drawn on it
    hires: Any = None  # txt2img: the Hires. fix accordion
    variation: Any = None  # the Variation seed accordion
    interrogate: dict = field(default_factory=dict)  # img2img: interrogator -> its button (A1111's two)
    controlnet: dict = field(default_factory=dict)  # the ControlNet panel's controls (CONTROLNET_CONTROLS)

    @property
    def inputs(self) -> list:
        return [self.prompt, self.negative, self.styles, self.n_iter, *self.controlnet.values(),
                *self.fields.values()]

    @property
    def outputs(self) -> list:
        return [self.gallery, self.preview, self.progress, self.info, self.last_seeds, self.infotexts]


INTERROGATE_BUTTONS = {CLIP_INTERROGATOR: "Interrogate CLIP", DEEPBOORU: "Interrogate DeepBooru"}  # A1111's img2img


def _interrogate_buttons(interrogators: tuple[str, ...]) -> dict[str, Any]:
    """A1111's Interrogate CLIP / DeepBooru buttons, shown for the interrogators the server has."""
    with gr.Row():
        return {model: gr.Button(label, size="sm", visible=model in interrogators, elem_id=f"interrogate_{model}")
                for model, label in INTERROGATE_BUTTONS.items()}


# The ControlNet panel's controls, in the order the handlers read them (one unit, as the extension's first tab)
CONTROLNET_CONTROLS = ("enabled", "image", "model", "module", "weight", "guidance_start", "guidance_end",
                       "control_mode", "resize_mode", "pixel_perfect")


def _controlnet_panel(kind: str, models: list[str]) -> dict[str, Any]:
    """sd-webui-controlnet's unit panel (its first unit), shown when the server has ControlNets."""
    with gr.Accordion("ControlNet", open=False, visible=bool(models), elem_id=f"{kind}_controlnet"):
        controls = {"enabled": gr.Checkbox(False, label="Enable", elem_id=f"{kind}_controlnet_enable"),
                    "image": gr.Image(label="Control picture", type="numpy", sources=["upload", "clipboard"],
                                      elem_id=f"{kind}_controlnet_image", height=256)}
        with gr.Row():
            controls["model"] = gr.Dropdown(choices=models, value=models[0] if models else None, label="Model",
                                            elem_id=f"{kind}_controlnet_model")
            controls["module"] = gr.Dropdown(choices=list(PREPROCESSORS), value="none", label="Preprocessor",
                                             elem_id=f"{kind}_controlnet_module")
        controls["weight"] = gr.Slider(0, 2, value=1, step=0.05, label="Control Weight")
        with gr.Row():
            controls["guidance_start"] = gr.Slider(0, 1, value=0, step=0.01, label="Starting Control Step")
            controls["guidance_end"] = gr.Slider(0, 1, value=1, step=0.01, label="Ending Control Step")
        controls["control_mode"] = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control Mode")
        controls["resize_mode"] = gr.Radio(list(CONTROLNET_RESIZE_MODES), value="Crop and Resize",
                                           label="Resize Mode")
        controls["pixel_perfect"] = gr.Checkbox(False, label="Pixel Perfect")
    return controls


def _generation_tab(spec, kind: str, styles: list[str], interrogators: tuple[str, ...] = (),
                    controlnets: list[str] | None = None) -> Tab:
    picture = hires = None
    with gr.Row():
        with gr.Column(scale=4):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a lighthouse on a cliff, (oil painting:1.2)",
                                elem_id=f"{kind}_prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{kind}_neg_prompt")
            style_picker = gr.Dropdown(choices=styles, value=[], multiselect=True, label="Styles",
                                       visible=bool(styles), elem_id=f"{kind}_styles")
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{kind}_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", size="sm", elem_id=f"{kind}_interrupt")
                skip = gr.Button("Skip", size="sm", elem_id=f"{kind}_skip")
            interrogate = _interrogate_buttons(interrogators) if kind == "img2img" else {}
    fields: dict[str, Any] = {}

    def row(*names: str) -> None:  # request fields side by side
        with gr.Row():
            for name in names:
                fields[name] = _control(spec, name)

    with gr.Row():
        with gr.Column():
            if kind == "img2img":
                picture = guarded_picture(gr.ImageMask(
                    label="Picture (draw the inpainting mask on it; no mask: img2img)", type="numpy",
                    image_mode="RGBA", sources=["upload", "clipboard"],
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), elem_id="img2img_picture", height=420))
                fields["resize_mode"] = _control(spec, "resize_mode")
            row("sampler", "schedule_type")
            fields["steps"] = _control(spec, "steps")
            if kind == "txt2img":
                with gr.Accordion("Hires. fix", open=False) as hires:
                    fields["enable_hr"] = _control(spec, "enable_hr")
                    row("hr_upscaler", "hr_second_pass_steps")
                    row("denoising_strength", "hr_scale")
            else:
                with gr.Accordion("Inpainting", open=True):
                    fields["mask_blur"] = _control(spec, "mask_blur")
                    fields["inpainting_fill"] = _control(spec, "inpainting_fill")
                    row("inpaint_full_res", "inpaint_full_res_padding")
            with gr.Row():
                with gr.Column(scale=3):
                    fields["width"] = _control(spec, "width")
                    fields["height"] = _control(spec, "height")
                with gr.Column(scale=2):
                    n_iter = gr.Slider(minimum=1, maximum=MAX_BATCH_COUNT, value=1, step=1, label="Batch count")
                    fields["batch_size"] = _control(spec, "batch_size")
            fields["guidance_scale"] = _control(spec, "guidance_scale")
            if kind == "img2img":
                fields["denoising_strength"] = _control(spec, "denoising_strength")
            with gr.Row():
                fields["seed"] = _control(spec, "seed", scale=4)
                random_seed = gr.Button("Random seed", scale=1, size="sm")
                reuse_seed = gr.Button("Reuse last seed", scale=1, size="sm")
            with gr.Accordion("Variation seed", open=False) as variation:
                row("subseed", "subseed_strength")
                row("seed_resize_from_w", "seed_resize_from_h")
            controlnet = _controlnet_panel(kind, controlnets or [])
            unplaced = [name for name in tab_fields(kind) if name not in fields]
            if unplaced:  # a field the layout above does not place yet still gets its control
                with gr.Accordion("Other settings", open=False):
                    for name in unplaced:
                        fields[name] = _control(spec, name)
        with gr.Column():
            progress = gr.HTML(elem_id=f"{kind}_progress")
            preview = gr.Image(label="Live preview", visible=False, interactive=False, height=256,
                               elem_id=f"{kind}_preview")
            gallery = gr.Gallery(label="Output", columns=2, height="auto", format="png", elem_id=f"{kind}_gallery")
            info = gr.Textbox(label="Generation parameters (A1111 infotext)", lines=4, interactive=False,
                              elem_id=f"{kind}_info")
    last_seeds, infotexts = gr.State([]), gr.State([])
    random_seed.click(lambda: -1, outputs=fields["seed"])
    reuse_seed.click(lambda seeds: seeds[0] if seeds else -1, inputs=last_seeds, outputs=fields["seed"])
    # keep the order the handlers read them in
    fields = {name: fields[name] for name in tab_fields(kind)}
    return Tab(prompt, negative, style_picker, n_iter, fields, generate, interrupt, skip, gallery, preview, progress,
               info, last_seeds, infotexts, picture, hires, variation, interrogate, controlnet)


def _too_many_pixels(value: str) -> InvalidRequest:
    side = int(MAX_PICTURE_PIXELS ** 0.5)
    return InvalidRequest("init_image", value, f"a picture of at most {MAX_PICTURE_PIXELS:,} pixels: make it smaller "
                          f"(e.g. at most {side} x {side}) before uploading it")


def guarded_picture(component: gr.ImageMask) -> gr.ImageMask:
    """The img2img picture: Gradio's ImageMask decodes the upload and the drawn layers itself with ``Image.open``
    (held by serve_ui to sdtrt's formats and pixel limit: restrict_pillow). What it cannot decode is refused
    naming the field; Gradio would show any error but a gr.Error as a bare "Error". (Wrapped per instance, not
    subclassed: Gradio writes a .pyi beside the module of every component subclass, which a read-only image
    cannot take.)"""
    decode = component.preprocess

    def preprocess(payload):
        try:
            return decode(payload)
        except Image.DecompressionBombError as exc:  # its header claims more pixels than restrict_pillow allows
            log.warning("img2img picture refused: %s", exc)
            raise _error(_too_many_pixels("<a picture of more pixels than the page decodes>")) from None
        except (OSError, SyntaxError, ValueError) as exc:  # not PNG/JPEG/WebP (Pillow knows no other), or damaged
            log.warning("img2img picture refused: %s: %s", type(exc).__name__, exc)  # (its text names the file)
            raise _error(InvalidRequest("init_image", "<the uploaded file>", "a PNG, JPEG or WebP picture (this "
                                        "is another format, or it is damaged): save it as one of those")) from None

    component.preprocess = preprocess
    return component


def _mask_and_picture(value: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """The init picture (RGB) and the drawn mask (white = repaint; None when nothing was drawn) from the
    ImageMask's value: its background and the alpha of its brush layers."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise InvalidRequest("init_image", None, "a picture: upload one in the img2img tab")
    background = value["background"]
    shape = getattr(background, "shape", ())
    if len(shape) not in (2, 3) or (len(shape) == 3 and not 1 <= shape[2] <= 4):
        raise InvalidRequest("init_image", f"<an array of shape {shape}>", "a picture")
    # Gradio has decoded it already, within the limit serve_ui gives Pillow; this holds a page built otherwise too.
    if shape[0] * shape[1] > MAX_PICTURE_PIXELS:
        raise _too_many_pixels(f"<{shape[1]}x{shape[0]} picture>")
    background = np.asarray(background)
    picture = background[..., :3] if background.ndim == 3 else np.stack([background] * 3, axis=-1)
    if picture.shape[2] < 3:  # grey with alpha
        picture = np.concatenate([picture[..., :1]] * 3, axis=-1)
    drawn = np.zeros(picture.shape[:2], dtype=bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4 and layer.shape[:2] == drawn.shape:
            drawn |= layer[..., 3] > 0
    return np.ascontiguousarray(picture, dtype=np.uint8), (drawn.astype(np.uint8) * 255 if drawn.any() else None)


def _error(message: Any) -> gr.Error:
    """An error the page shows: Gradio renders its text as HTML, so it is escaped (sdtrt's messages write values
    as ``<5000x4000 picture>``, and a value the browser sent must not become markup)."""
    return gr.Error(html.escape(str(message), quote=False))


def _gallery_picture(image: np.ndarray, infotext: str) -> Image.Image:
    """A result as the gallery gets it: Gradio writes it to its own cache as a PNG, infotext kept (it copies a
    picture's text chunks), and serves that copy; the outputs folder is never named to Gradio."""
    picture = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    picture.info["parameters"] = infotext
    return picture


def _uploaded_file(path: Any, what: str) -> Path:
    """``path`` (from the browser) when it is a file inside Gradio's upload folder, symlinks resolved; a gr.Error
    otherwise. Gradio checks this itself only for file data marked as such (with ``meta``); a client that leaves
    the mark out reaches a handler with any path it likes."""
    refused = _error(f"{what}: the picture is not one uploaded to this page; upload it again")
    if not isinstance(path, str) or not path:
        raise refused
    try:
        folder = Path(get_upload_folder()).resolve()
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
        raise refused from None
    if not resolved.is_relative_to(folder) or not resolved.is_file():
        raise refused
    return resolved


def png_info(payload: Any) -> str:
    """PNG Info: the infotext of the uploaded picture. The event runs without Gradio's preprocessing (which would
    open any path with every format Pillow knows): the upload's path is checked, then the file is decoded by
    :func:`sdtrt.contract.pictures.open_picture` (PNG, JPEG or WebP; too large or too many pixels refused before decoding)."""
    if payload is None:
        return ""
    path = payload.get("path") if isinstance(payload, dict) else None
    file = _uploaded_file(path, "PNG Info")
    try:
        picture = open_picture(file, "image")
    except InvalidRequest as exc:
        raise _error(f"PNG Info: {exc}") from None
    text = picture.info.get("parameters")
    return text if isinstance(text, str) else ""


def show_info(infotexts: list[str], evt: gr.SelectData) -> Any:
    """The infotext of the picture clicked in a gallery: the one sdtrt produced for it, kept in this session's
    state; the browser says only which picture (its index), never a path to read."""
    index = evt.index
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(infotexts or []):
        return infotexts[index]
    return gr.update()


@dataclass(frozen=True)
class Sent:
    """What the browser sent with Generate, as the tab's inputs give it (nothing checked yet)."""

    kind: str  # txt2img or img2img
    model_title: Any
    clip: Any
    prompt: Any
    negative: Any
    chosen: Any  # styles
    n_iter: Any
    values: tuple  # the tab's request fields, in its order
    picture: Any = None  # img2img: the sketch/upload with its mask
    controlnet: tuple = ()  # the ControlNet panel's values (CONTROLNET_CONTROLS)

    @classmethod
    def of(cls, kind: str, inputs: tuple) -> "Sent":
        model_title, clip, *rest = inputs
        picture = rest.pop(0) if kind == "img2img" else None
        prompt, negative, chosen, n_iter, *values = rest
        unit, values = values[:len(CONTROLNET_CONTROLS)], values[len(CONTROLNET_CONTROLS):]
        return cls(kind, model_title, clip, prompt, negative, chosen, n_iter, tuple(values), picture, tuple(unit))


@dataclass(frozen=True)
class Checked:
    """A generation as the page sends it to the server: every field checked and typed."""

    model: str
    clip_skip: int
    prompt: str
    negative: str
    n_iter: int
    fields: dict[str, Any]
    init_and_mask: tuple | None
    controlnet: tuple = ()  # the unit the ControlNet panel enables, with its picture (none: not enabled)


def controlnet_unit(values: tuple, models: list[str]) -> tuple:
    """The ControlNet panel's unit, checked (nothing: the panel is not enabled): a model the server has, a
    picture; the rest is the client's to check (InvalidRequest naming the setting)."""
    unit = dict(zip(CONTROLNET_CONTROLS, values))
    if not unit.get("enabled"):
        return ()
    if unit.get("model") not in models:
        raise InvalidRequest("ControlNet model", unit.get("model"), "one of the server's ControlNets: " +
                             (", ".join(models) or "none (export with --controlnets DIR)"))
    picture = unit.pop("image")
    if not isinstance(picture, np.ndarray) or picture.ndim != 3:
        raise InvalidRequest("Control picture", None, "a picture: upload one for the ControlNet unit")
    if picture.shape[0] * picture.shape[1] > MAX_PICTURE_PIXELS:
        raise _too_many_pixels(f"<{picture.shape[1]}x{picture.shape[0]} picture>")
    unit.pop("enabled")
    return ({**unit, "weight": float(unit["weight"]), "guidance_start": float(unit["guidance_start"]),
             "guidance_end": float(unit["guidance_end"]), "pixel_perfect": bool(unit["pixel_perfect"]),
             "image": np.ascontiguousarray(picture[..., :3], dtype=np.uint8)},)


class Page:
    """The page's controls and what they do: one Page per served page (its models, styles and jobs)."""

    def __init__(self, client: Client, outputs: Path, styles_file: Path | None):
        self.client = client
        self.outputs = outputs
        self.spec = client.spec  # the default model's ranges and defaults shape the controls
        self.jobs = PageJobs()
        self.styles = load_styles(styles_file)
        self.tabs: dict[str, Tab] = {}

    def titles(self) -> dict[str, str]:
        return {s.title: key for key, s in self.client.catalog.models.items()}

    # --- layout ----------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
            gr.HTML(f"<style>{PROGRESS_CSS}</style>", visible=True, padding=False)
            gr.Markdown(f"## {TITLE}\nServer `{self.client.url}` ({self.client.protocol})")
            with gr.Row():
                self.checkpoint = gr.Dropdown(choices=list(self.titles()), value=self.spec.title,
                                              label="Stable Diffusion checkpoint", scale=4, elem_id="checkpoint")
                self.refresh = gr.Button("Refresh", scale=0, min_width=80, elem_id="refresh_checkpoints")
                self.clip_skip = _control(self.spec, "clip_skip", scale=2)
            with gr.Tabs() as self.tab_strip:
                for kind in ("txt2img", "img2img"):
                    with gr.Tab(kind, id=kind, elem_id=f"tab_{kind}"):
                        self.tabs[kind] = _generation_tab(self.spec, kind, list(self.styles),
                                                          tuple(self.client.interrogators()),
                                                          self.client.controlnets())
                with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
                    self.extras_tab()
                with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                    self.png_info_tab()
            self.wire()
        return demo

    def extras_upscalers(self) -> list[str]:
        """A1111's Extras upscalers: PIL's and the server's upscaler models."""
        return [*EXTRAS_UPSCALERS, *self.client.upscalers()]

    def extras_tab(self) -> None:
        with gr.Row():
            with gr.Column():
                self.extras_image = gr.Image(label="Source", type="pil", sources=["upload", "clipboard"],
                                             elem_id="extras_image")
                self.extras_upscaler = gr.Dropdown(choices=self.extras_upscalers(), value="Lanczos", label="Upscaler 1",
                                                   elem_id="extras_upscaler_1")
                self.extras_scale = gr.Slider(1, 8, value=2, step=0.05, label="Scale by", elem_id="extras_scale")
                self.extras_faces = [  # A1111's GFPGAN and CodeFormer steps (the server's face restorers)
                    gr.Slider(0, 1, value=0, step=0.001, label="GFPGAN visibility", elem_id="extras_gfpgan_visibility"),
                    gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer visibility",
                              elem_id="extras_codeformer_visibility"),
                    gr.Slider(0, 1, value=0, step=0.001, label="CodeFormer weight (0 = maximum effect, 1 = minimum "
                              "effect)", elem_id="extras_codeformer_weight")]
                self.extras_run = gr.Button("Upscale", variant="primary", elem_id="extras_generate")
            with gr.Column():
                self.extras_result = gr.Image(label="Result", type="pil", interactive=False, elem_id="extras_result")
                self.extras_info = gr.Textbox(label="Postprocessing", interactive=False, elem_id="extras_info")

    def extras_handler(self, picture: Any, upscaler: Any, scale: Any, *faces: Any) -> tuple[Image.Image, str]:
        """A1111's Extras upscale of the uploaded picture, bounded before any pixel is made, then its face steps
        (``faces``: GFPGAN visibility, CodeFormer visibility and weight)."""
        if not isinstance(picture, Image.Image):
            raise _error("upload a picture to upscale")
        if picture.width * picture.height > MAX_PICTURE_PIXELS:
            raise _error(str(_too_many_pixels(f"<{picture.width}x{picture.height} picture>")))
        names = self.extras_upscalers()
        if upscaler not in names:
            raise _error(f"unknown upscaler {echo(upscaler)}: choose one of {', '.join(names)}")
        try:
            scale = float(scale)
            if not 1 <= scale <= 8:
                raise InvalidRequest("upscaling_resize", scale, "from 1 to 8")
            models = None if upscaler in EXTRAS_UPSCALERS else ModelUpscalers({upscaler: self.client.upscaler(upscaler)})
            steps = ExtrasFaces.checked(*faces, tuple(self.client.face_restorers()))
            result, done = extras_upscale(picture.convert("RGB"), ExtrasUpscale(upscaler, scale=scale), models)
            result, faces_done = extras_faces(result, steps, self.client.face_networks)
        except (InvalidRequest, ValueError, TypeError) as exc:
            raise _error(str(exc)) from None
        return result, ", ".join(f"{k}: {v}" for k, v in {**done, **faces_done}.items())

    def png_info_tab(self) -> None:
        with gr.Row():
            with gr.Column():
                self.png = gr.Image(label="Source", type="filepath", sources=["upload", "clipboard"],
                                    elem_id="pnginfo_image")
            with gr.Column():
                self.png_text = gr.Textbox(label="Parameters", lines=6, interactive=False, elem_id="pnginfo_text")
                self.send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")

    def wire(self) -> None:
        self.refresh.click(self.refresh_models, outputs=self.checkpoint)
        for kind, tab in self.tabs.items():
            handler = self.txt2img_handler if kind == "txt2img" else self.img2img_handler
            inputs = [self.checkpoint, self.clip_skip, *([tab.picture] if kind == "img2img" else []), *tab.inputs]
            tab.generate.click(handler, inputs=inputs, outputs=tab.outputs)
            tab.prompt.submit(handler, inputs=inputs, outputs=tab.outputs)
            tab.interrupt.click(_session_call(self.jobs.interrupt), inputs=None, outputs=None, concurrency_limit=None)
            tab.skip.click(_session_call(self.jobs.skip), inputs=None, outputs=None, concurrency_limit=None)
            tab.gallery.select(show_info, inputs=tab.infotexts, outputs=tab.info)
            for model, button in tab.interrogate.items():
                button.click(functools.partial(self.interrogate_handler, model), inputs=tab.picture,
                             outputs=tab.prompt)
        self.png.change(png_info, inputs=self.png, outputs=self.png_text, preprocess=False)
        self.extras_run.click(self.extras_handler, inputs=[self.extras_image, self.extras_upscaler, self.extras_scale,
                                                           *self.extras_faces],
                              outputs=[self.extras_result, self.extras_info])
        t2i = self.tabs["txt2img"]
        self.send.click(self.send_to_txt2img, inputs=self.png_text,
                        outputs=[t2i.prompt, t2i.negative, *t2i.fields.values(), self.clip_skip, self.checkpoint,
                                 t2i.hires, t2i.variation, self.tab_strip])

    # --- events ----------------------------------------------------------------------------------------
    def interrogate_handler(self, model: str, picture: Any) -> str:
        """A1111's Interrogate buttons: the img2img picture's interrogation becomes the prompt (A1111's
        defaults for the interrogators' options: the page has no settings tab)."""
        try:
            image, _ = _mask_and_picture(picture)
            return self.client.interrogate(Image.fromarray(image), model)
        except SdtrtError as exc:
            raise _error(exc) from None

    def refresh_models(self):
        self.client.refresh()
        return gr.update(choices=list(self.titles()))

    def txt2img_handler(self, request: gr.Request, *inputs):
        yield from self.run(request, Sent.of("txt2img", inputs))

    def img2img_handler(self, request: gr.Request, *inputs):
        yield from self.run(request, Sent.of("img2img", inputs))

    def checked(self, sent: Sent) -> Checked:
        """What the browser sent, checked before any work starts: a model the server has, styles the page
        offers, the batch count within the slider's range, each field in its type (the client checks ranges)."""
        models = self.titles()
        if not isinstance(sent.model_title, str) or sent.model_title not in models:
            raise _error(f"unknown checkpoint {echo(sent.model_title)}: choose one of the server's models "
                         "(Refresh updates the list)")
        chosen = [] if sent.chosen is None else sent.chosen
        if not isinstance(chosen, list) or not all(isinstance(s, str) and s in self.styles for s in chosen):
            raise _error(f"unknown style in {echo(chosen)}: choose among the page's styles ({len(self.styles)})")
        try:
            count = _whole(sent.n_iter, "n_iter", 1, MAX_BATCH_COUNT, "Batch count")
            names = tuple(self.tabs[sent.kind].fields)
            fields = {name: _typed(self.spec, name, value) for name, value in zip(names, sent.values)}
            clip = _typed(self.spec, "clip_skip", sent.clip)
            init_and_mask = _mask_and_picture(sent.picture) if sent.kind == "img2img" else None
            unit = controlnet_unit(sent.controlnet, self.client.controlnets())
        except InvalidRequest as exc:
            raise _error(str(exc)) from None
        prompt, negative = apply_styles(sent.prompt or "", sent.negative or "", [self.styles[s] for s in chosen])
        return Checked(models[sent.model_title], int(clip), prompt, negative, count, fields, init_and_mask, unit)

    def run(self, request: gr.Request, sent: Sent):
        """One generation, its progress shown while it runs; stopped if the page goes away."""
        job = self.checked(sent)
        control = self.jobs.start(request.session_hash)
        state = Followed(control, job.n_iter)
        try:
            for latest in follow(self.client, state, self.work(sent.kind, job, control)):
                preview = gr.update(value=latest.preview, visible=True) if latest and latest.preview is not None \
                    else gr.skip()
                yield gr.skip(), preview, progress_html(state, latest), gr.skip(), gr.skip(), gr.skip()
        except InvalidRequest as exc:
            raise _error(str(exc)) from None
        finally:
            # Still running here: Gradio closed this handler because the browser went away (the page was
            # closed or reloaded). Nobody will see the pictures: stop the server's loops within a step.
            if state.thread is not None and state.thread.is_alive():
                log.warning("page closed: interrupting its generation (request %s)", control.request_id)
                control.interrupt()
            self.jobs.end(request.session_hash, control)
        if isinstance(state.error, (InvalidRequest, ServerRefused)):  # they name the field, for the user to fix
            raise _error(str(state.error))
        if isinstance(state.error, ServerError):  # its words name the server's address: they go to the log only
            raise _error(server_failure(state.error, log))
        if state.error is not None:
            raise state.error
        result = state.result
        self.save(sent.kind, result)
        pictures = [(_gallery_picture(image, text), f"seed {s}")
                    for image, s, text in zip(result.images, result.seeds, result.infotexts)]
        yield (pictures, gr.update(visible=False), progress_html(state, None),
               result.infotexts[0] if result.infotexts else "", result.seeds, list(result.infotexts))

    def work(self, kind: str, job: Checked, control: JobControl) -> Callable:
        """The client call that runs ``job``, given the callback that follows its batches."""
        common = dict(model=job.model, negative_prompt=job.negative, clip_skip=job.clip_skip, control=control,
                      n_iter=job.n_iter, **job.fields, **({"controlnet": list(job.controlnet)} if job.controlnet else {}))
        if kind == "txt2img":
            return lambda on_batch: self.client.txt2img(job.prompt, progress=on_batch, **common)
        init, mask = job.init_and_mask
        return lambda on_batch: self.client.img2img(job.prompt, init, mask, progress=on_batch, **common)

    def save(self, kind: str, result) -> None:
        try:
            for image, s, text in zip(result.images, result.seeds, result.infotexts):
                save_png(image, s, text, self.outputs / f"{kind}-images")
        except DiskFull as exc:  # the pictures are shown all the same; nothing half written is left
            log.error("outputs not saved: %s", exc)
            gr.Warning(f"not saved: the page's output folder is full ({disk_full_summary(exc)}); the pictures "
                       "below are not on the server's disk: download them, and tell the page's operator")

    def send_to_txt2img(self, text: str):
        """The infotext's settings into the txt2img tab's controls (as A1111's "Send to txt2img")."""
        if not text:
            raise _error("no parameters to send: upload a PNG written by sdtrt or A1111 first")
        read = settings_from_infotext(text)
        updates = [gr.update(value=read.get("prompt", "")), gr.update(value=read.get("negative_prompt", ""))]
        for name in self.tabs["txt2img"].fields:
            value = read.get(name)
            try:
                updates.append(gr.update(value=_typed(self.spec, name, value)) if value is not None else gr.skip())
            except (TypeError, ValueError):
                updates.append(gr.skip())
        clip = read.get("clip_skip")
        updates.append(gr.update(value=int(clip)) if clip is not None else gr.update(value=1))
        wanted = read.get("Model hash")
        found = [t for t, key in self.titles().items()
                 if wanted and self.client.catalog.models[key].model_hash == wanted]
        updates.append(gr.update(value=found[0]) if found else gr.skip())
        # the accordions holding settings the infotext sets are opened, so that they show
        updates += [gr.update(open=True) if read.get("enable_hr") else gr.skip(),
                    gr.update(open=True) if read.get("subseed_strength") not in (None, "0", 0) else gr.skip()]
        return [*updates, gr.Tabs(selected="txt2img")]


def build_ui(client: Client, outputs: Path = Path("outputs"),
             styles_file: Path | None = DEFAULT_STYLES_FILE) -> gr.Blocks:
    return Page(client, outputs, styles_file).build()


def _session_call(action: Callable[[str], None]):
    """A handler that applies ``action`` to the calling browser session's generation."""

    def handler(request: gr.Request) -> None:
        action(request.session_hash)

    return handler


# ---- the front door: PageGuard, an ASGI middleware in front of every route of the app Gradio builds ----

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# What a browser that has not logged in may fetch: the login page and the static frontend that draws it.
# Everything else (the config, the API and its description, files, the queue, uploads, heartbeats, cancel, the run
# history...) wants the login, whatever Gradio's own route says.
# (/gradio_api/startup-events: Gradio's launch() calls it itself, without a login; it acts once, at launch.)
OPEN_PATHS = {"/", "/favicon.ico", "/theme.css", "/manifest.json", "/robots.txt", "/logout", "/logout/",
              "/gradio_api/startup-events"}
OPEN_PREFIXES = ("/assets/", "/static/", "/pwa_icon")
LOGIN_PATHS = {"/login", "/login/"}
LOGIN_CHECK = "/gradio_api/login_check"  # Gradio's own answer to "is this request logged in?" (200 or 401)
_API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.DOTALL)  # JSON there escapes '<'
_NO_API_INFO = b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'


def _refused_cross_site(scope: Scope) -> bool:
    """A cross-site request is refused unless it is a plain navigation to a page (a link to the page from
    elsewhere): no form POST, no script's fetch (it could start or interrupt a generation, or read results with
    the user's login cookie: Gradio's CORS middleware grants any origin, with credentials, whenever the page is
    reached under a name other than localhost)."""
    if not cross_site(scope):
        return False
    navigating = scope["type"] == "http" and scope.get("method") in ("GET", "HEAD") and \
        _header(scope, b"sec-fetch-mode") == "navigate"
    return not navigating


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


async def _answer(scope: Scope, send: Send, status: int, detail: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
        return
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class PageGuard:
    """ASGI middleware for the page's app (given to Gradio as a FastAPI middleware, so it is in front of every
    route Gradio adds): cross-site requests refused (403), request bodies bounded (413), and with ``login``
    every route but the login page and its static files wants a logged-in session (401), Gradio's own
    login_check deciding who is logged in. The login page itself is served without the description of the
    page's API that Gradio embeds in it."""

    def __init__(self, app, login: bool = False, max_body: int = PAGE_MAX_BODY, ready=None):
        """``ready``: a function that says whether the server behind the page is ready (GET /healthz)."""
        self.app = app
        self.login = login
        self.max_body = max_body
        self.ready = ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if _refused_cross_site(scope):
            await _answer(scope, send, 403, "cross-site request refused: use the page itself")
            return
        method = scope.get("method", "GET")
        if scope["type"] == "http" and self.ready is not None and _route_path(scope) == HEALTH_PATH:
            ready = await asyncio.to_thread(self.ready)  # (open: Kubernetes' probes; it says only that)
            await _answer(scope, send, 200 if ready else 503, "ok" if ready else "unavailable")
            return
        if scope["type"] == "http":
            length = _header(scope, b"content-length")
            if length is not None and (not length.strip().isdigit() or int(length) > self.max_body):
                await _answer(scope, send, 413, f"request body over {self.max_body // 2**20} MiB")
                return
            if length is None and method not in SAFE_METHODS:
                receive = self._bounded(receive)
        path = _route_path(scope)
        if self.login:
            open_ = (path in LOGIN_PATHS and method == "POST") or (
                method in ("GET", "HEAD") and (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)))
            logged_in = False if open_ and path != "/" else await self._logged_in(scope)
            if not open_ and not logged_in:
                await _answer(scope, send, 401, "Not authenticated: log in on the page first")
                return
            if path == "/" and not logged_in:
                send = self._without_api_info(send)
        await self.app(scope, receive, send)

    async def _logged_in(self, scope: Scope) -> bool:
        """Gradio's own login_check, asked in-process with this request's cookies (200: logged in)."""
        root = scope.get("root_path", "")
        sub = dict(scope, type="http", method="GET", path=root + LOGIN_CHECK, raw_path=(root + LOGIN_CHECK).encode(),
                   query_string=b"", headers=[(k, v) for k, v in scope.get("headers") or [] if k == b"cookie"])
        sub.setdefault("http_version", "1.1")
        status: list[int] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        try:
            await self.app(sub, receive, send)
        except Exception:
            return False
        return status[:1] == [200]

    def _bounded(self, receive: Receive) -> Receive:
        """A body sent without Content-Length, counted as it arrives; past the ceiling the app sees a disconnect."""
        seen = 0

        async def bounded() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    return {"type": "http.disconnect"}
            return message

        return bounded

    @staticmethod
    def _without_api_info(send: Send) -> Send:
        """The login page without the API description Gradio writes into every rendering of "/"."""
        start: dict = {}
        chunks: list[bytes] = []

        async def rewrite(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = _API_INFO.sub(lambda _: _NO_API_INFO, b"".join(chunks), count=1)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            if start.get("status") != 304 and body:
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        return rewrite


def offline_theme():
    """Gradio's default theme with system fonts: the stock one fetches Google Fonts, which offline and
    air-gapped deployments cannot reach (the page then waits on them)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve_ui(client: Client, host: str, port: int, outputs: Path = Path("outputs"),
             auth: dict[str, str] | None = None, styles_file: Path | None = DEFAULT_STYLES_FILE) -> None:
    """Serve the page; with ``auth`` (user -> password) it asks for a login first (Gradio's, as A1111's
    ``--gradio-auth``), on every route (:class:`PageGuard`)."""
    # Gradio decodes the img2img picture itself, with a plain Image.open: every format Pillow knows (some parsers
    # never meant for untrusted files), and Pillow's default bomb limit lets 179 megapixels through (716 MB as
    # RGBA, per layer). Held to what open_picture takes: PNG, JPEG, WebP, refused past MAX_PICTURE_PIXELS before
    # any pixel is decoded (guarded_picture says so naming the field).
    restrict_pillow()
    demo = build_ui(client, outputs, styles_file)
    # No allowed_paths: the outputs folder is not served (it holds every user's pictures); the gallery's pictures
    # are Gradio's own copies. SSR and the MCP server stay off so that nothing answers beside the guarded app.
    demo.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, share=False, theme=offline_theme(),
        auth=list(auth.items()) if auth else None, max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False, mcp_server=False,
        app_kwargs={"middleware": [Middleware(PageGuard, login=bool(auth), ready=client.is_ready)]})
