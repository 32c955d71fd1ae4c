"""An AUTOMATIC1111-compatible REST gateway (``/sdapi/v1``) in front of a running sdtrt server.

Scripts, bots and plugins written for A1111's API work unchanged: same paths, same request and response JSON,
A1111's defaults, ``null`` for "the default" as A1111 takes it. The translation both ways is pure functions
(a1111_requests.py: A1111's requests into sdtrt's settings; a1111_responses.py: sdtrt's answers in A1111's
shapes); this module holds the gateway's state (each user's options, the generations under way) and the routes,
each a few lines over :class:`sdtrt.client.Client`. No model code runs here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import anyio
import anyio.to_thread
from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdtrt import __version__
from sdtrt.client.apps import a1111_responses as answer
from sdtrt.client.apps.a1111_requests import (
    A1111_NAME,
    SAMPLER_OPTIONS,
    TILE_OPTIONS,
    ExtrasBatchBody,
    ExtrasSingleImageBody,
    Img2ImgBody,
    Job,
    Txt2ImgBody,
    UserOptions,
    _Request,
    a1111_defaults,
    check_extras_size,
    decode_image,
    extras_face_steps,
    extras_job,
    ignored_fields,
    img2img_pictures,
    load_user_options,
    open_image,
    refuse,
    sampler_options,
    save_user_options,
    translate,
    updated_options,
)
from sdtrt.client.apps.a1111_controlnet import add_controlnet_routes, a1111_unit_field
from sdtrt.client.apps.a1111_alwayson import alwayson_info, alwayson_settings, alwayson_titles, ignored_alwayson
from sdtrt.client.apps.a1111_scripts import Script, find_script, script_info, script_titles
from sdtrt.client.apps.web_guard import DEFAULT_MAX_BODY, USER_KEY, WebGuard, server_failure
from sdtrt.client.apps.web_guard import logged as log_failure
from sdtrt.client.client import Client, ServerError, ServerRefused, ServerUnavailable
from sdtrt.contract.errors import ERROR_KINDS, DiskFull, InvalidRequest, echo, invalid_field
from sdtrt.contract.hires import Tiling
from sdtrt.contract.outputs import disk_full_summary, save_png
from sdtrt.contract.prometheus import scrape
from sdtrt.contract.spec import IMG2IMG, TXT2IMG
from sdtrt.requests.generation import Generation
from sdtrt.requests.styles import load_styles
from sdtrt.postprocessing.faces import extras_faces
from sdtrt.postprocessing.upscale import EXTRAS_UPSCALERS, ExtrasUpscale, ModelUpscalers, extras_upscale

log = logging.getLogger("sdtrt.gateway")

__all__ = ["Gateway", "Img2ImgBody", "Txt2ImgBody", "create_app"]

# A generation's call: (settings, progress callback, control) -> the server's answer
Call = Callable[[dict[str, Any], Callable[[int, int], None], Any], Generation]

# The kind (a row of sdtrt.contract.errors.ERROR_KINDS) of each error the gateway answers, the first class that
# matches: the client's classes are the server's kinds as they reach it, and any other failure of the server is
# "other". The gateway's statuses are the table's, so the table is what its clients see. (Cancelled reaches no
# client of the gateway as an error: the gateway's own interrupt answers A1111's 200 with the batches done.)
ERROR_CLASSES: tuple[tuple[type[BaseException], str], ...] = (
    (InvalidRequest, "InvalidRequest"), (ServerRefused, "InvalidRequest"), (ServerUnavailable, "Unavailable"),
    (DiskFull, "DiskFull"))


def header_list(names: list[str]) -> str:
    """Field names as a header value: HTTP headers are Latin-1, a client's key may be any text (percent-encoded,
    as a URL would carry it), at most 2,000 characters."""
    return ",".join(quote(name, safe="._-[]") for name in names)[:2000]


def gateway_status(exc: BaseException) -> int:
    """The HTTP status the gateway answers ``exc`` with: its kind's in ERROR_KINDS."""
    kind = next((kind for cls, kind in ERROR_CLASSES if isinstance(exc, cls)), "other")
    return ERROR_KINDS[kind]["gateway"]


class Gateway:
    """The gateway's state: the client, each user's A1111 options, the generations under way."""

    def __init__(self, client: Client, outputs: Path | None = None, styles_file: Path | None = None,
                 options_file: Path | None = None):
        self.client = client
        self.outputs = outputs
        self.styles_file = styles_file
        self._styles: tuple[float | None, dict] = (None, {})  # (the file's mtime when read, its styles)
        self.lock = threading.RLock()
        self.options_file = options_file  # each user's options, kept across restarts (A1111's config.json)
        # at most one per set of credentials the gateway was given
        self._users: dict[str, UserOptions] = load_user_options(options_file) if options_file else {}
        # every generation under way, by (user, task id): what /progress, /interrupt and /skip reach
        self.jobs: dict[tuple[str, str], Job] = {}

    def user(self, name: str) -> UserOptions:
        with self.lock:
            return self._users.setdefault(name, UserOptions())

    def set_options(self, name: str, options: dict[str, Any]) -> None:
        """Read, check and store under one lock (two writes at once must not lose one), then kept in the file."""
        with self.lock:
            mine = updated_options(self.user(name), options, self.client.catalog, self.current(name))
            self._users[name] = mine
            if self.options_file is not None:
                save_user_options(self.options_file, self._users)

    def user_jobs(self, user: str) -> list[Job]:
        with self.lock:
            return [job for job in self.jobs.values() if job.user == user]

    def job(self, user: str, task_id: str | None) -> Job | None:
        """The user's generation ``task_id`` names, else their latest."""
        with self.lock:
            if task_id:
                return self.jobs.get((user, task_id))
            return next((j for j in reversed(self.jobs.values()) if j.user == user), None)

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

    def settings(self, body: _Request, user: str = "") -> dict[str, Any]:
        return {**translate(body, self.user(user), self.styles(), self.client.catalog), **alwayson_settings(body)}

    def ignored_fields(self, body: _Request) -> list[str]:
        return ignored_fields(body, self.styles()) + ignored_alwayson(body)

    # --- jobs ----------------------------------------------------------------------------------------------
    def claim(self, kind: str, body: _Request, user: str = "") -> Job:
        """Register a generation before it waits for a thread (it shows in /progress as queued, and /interrupt
        reaches it)."""
        job = Job.for_request(kind, body, user)
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

    def run(self, job: Job, body: _Request, call: Call, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """One claimed generation, answered in A1111's shape; released when it ends."""
        try:
            settings = self.settings(body, job.user) if settings is None else settings
            return self.answer(job, body, settings, self.generate(call, settings, job))
        finally:
            self.release(job)

    def answer(self, job: Job, body: _Request, settings: dict[str, Any], result: Generation) -> dict[str, Any]:
        """A finished request's pictures, saved as asked, in A1111's shape."""
        if body.save_images and self.outputs is not None:
            self.save(job.kind, result)
        spec = self.client.catalog.get(settings["model"])
        return answer.generation_response(body, settings, result, spec, job, self.ignored_fields(body))

    def run_script(self, job: Job, body: _Request, found: tuple[Script, list[Any]], init: list | None = None,
                   masks: tuple = (None, None), settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """One claimed request with a script: the script's generations one after another, each a plain request
        of the same user (checked and translated as one), then its pictures; released when it ends."""
        script, args = found
        finished = 0

        def generate(variant: _Request, pictures: list | None) -> Generation:
            nonlocal finished
            settings = self.settings(variant, job.user)
            job.control.next_generation()
            job.count = max(job.count, finished + variant.n_iter)

            def call(s: dict[str, Any], progress, control) -> Generation:
                if pictures is None:
                    return call_txt2img(self.client, variant.n_iter, s, progress, control)
                return call_img2img(self.client, variant.n_iter, s, (pictures, *masks), progress, control)

            result = self.generate(call, settings, job, offset=finished)
            finished += variant.n_iter
            return result

        generate.upscalers = lambda: self.upscaler_models(list(self.client.upscalers()), job.user)  # (Generate)
        generate.interrogate = lambda picture, model: self.interrogate(picture, model, job.user)
        try:
            if settings is None:  # the request's own fields, checked before anything starts
                settings = self.settings(body, job.user)
            return self.answer(job, body, settings, script.run(body, args, generate, init))
        finally:
            self.release(job)

    def interrogate(self, picture: Image.Image, model: str, user: str) -> str:
        """A1111's interrogator ``model`` on ``picture``, by the user's options (422 naming the field)."""
        try:
            return self.client.interrogate(picture, model, {**a1111_defaults(), **self.user(user).options})
        except InvalidRequest as exc:
            raise refuse(exc.field, str(exc)) from None

    def upscaler_models(self, names: list[str], user: str) -> ModelUpscalers:
        """The server's upscaler models ``names``, tiled by the user's ESRGAN_tile and SWIN_tile options."""
        options = sampler_options(self.user(user))
        by_field = {SAMPLER_OPTIONS[name]: options[name] for name in TILE_OPTIONS}  # (A1111's option -> its field)
        return ModelUpscalers({name: self.client.upscaler(name) for name in names}, Tiling.from_fields(by_field.__getitem__))

    def generate(self, call: Call, settings: dict[str, Any], job: Job, offset: int = 0) -> Generation:
        """The server's answer, its errors as A1111's statuses naming A1111's fields (``offset``: the batches of
        the job done before this call)."""
        def progress(done: int, total: int) -> None:
            job.done = offset + done

        try:
            return call(dict(settings), progress, job.control)  # (img2img pops the prompt)
        except InvalidRequest as exc:
            raise refuse(a1111_field(exc.field), str(exc)) from None
        except ServerRefused as exc:  # a check only the server could make: its words, as the gateway's own
            field = invalid_field(str(exc)) or "request"
            raise refuse(a1111_field(field), str(exc)) from None
        # (the server unavailable or failed: add_error_handlers answers, without the client's words)

    def save(self, kind: str, result: Generation) -> None:
        try:
            for image, seed, info in zip(result.images, result.seeds, result.infotexts):
                save_png(image, seed, info, self.outputs / f"{kind}-images")
        except DiskFull as exc:  # nothing partial is left (sdtrt.contract.files); the client learns what filled
            logged(exc)
            raise HTTPException(gateway_status(exc), detail=f"the gateway's output folder ({kind}-images) is full: "
                                            f"{disk_full_summary(exc)}. Send the request with save_images "
                                            "false, or have the operator free space") from None

    def memory(self, metrics_url: str | None) -> dict[str, Any]:
        if not metrics_url:
            return answer.memory_response(None)
        try:
            return answer.memory_response(scrape(metrics_url))
        except OSError as exc:  # its address stays in the log
            return answer.memory_response(None, f"the server's metrics could not be read (error {logged(exc)})")


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
    return log_failure(exc, log)


@dataclass(frozen=True)
class GatewayLimits:
    max_body: int = DEFAULT_MAX_BODY  # bytes of one request body
    max_generations: int = 32  # generations worked on at once (the control routes have threads of their own)


def create_app(client: Client, outputs: Path | None = None, auth: dict[str, str] | None = None, *,
               styles_file: Path | None = None, metrics_url: str | None = None,
               flags: dict[str, Any] | None = None, limits: GatewayLimits = GatewayLimits(),
               options_file: Path | None = None) -> FastAPI:
    """The gateway over ``client``; with ``auth`` (user -> password) every route wants HTTP basic auth, its
    documentation included, and each user sees and stops only their own generations. ``styles_file`` is A1111's
    styles.csv, ``metrics_url`` the server's Prometheus metrics (for /memory), ``flags`` what /cmd-flags answers
    (the command's flags, passwords and internal addresses left out), ``limits`` the largest request body and
    the generations worked on at once,
    ``options_file`` where each user's options are kept across restarts (None: in memory only)."""
    gateway = Gateway(client, outputs, styles_file, options_file)
    app = FastAPI(title="sdtrt: AUTOMATIC1111-compatible API", version=__version__,
                  description="The A1111 /sdapi/v1 endpoints a Stable Diffusion server can honour, served by sdtrt.")
    app.add_middleware(WebGuard, users=auth, max_body=limits.max_body)
    add_error_handlers(app)
    add_generation_routes(app, gateway, anyio.CapacityLimiter(limits.max_generations))
    add_control_routes(app, gateway)
    add_info_routes(app, gateway, metrics_url, flags)
    add_controlnet_routes(app, lambda: client.catalog)
    return app


def a1111_field(field: str) -> str:
    """A refused field by A1111's name for it (a ControlNet unit's: where the extension's args hold it)."""
    return a1111_unit_field(field) or A1111_NAME.get(field, field)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in A1111's shape; an unexpected one says only its id (the details stay in the log)."""
    @app.exception_handler(InvalidRequest)
    async def invalid(_, exc: InvalidRequest):
        detail = [{"loc": ["body", a1111_field(exc.field)], "msg": str(exc), "type": "value_error"}]
        return answer.a1111_error(gateway_status(exc), "InvalidRequest", detail, str(exc))

    @app.exception_handler(ServerError)  # from any route: a generation, or the models read when the server is down
    async def server_failed(_, exc: ServerError):
        if isinstance(exc, ServerRefused):  # its words name the field, as the gateway's own refusals do
            field = invalid_field(str(exc)) or "request"
            detail = [{"loc": ["body", a1111_field(field)], "msg": str(exc), "type": "value_error"}]
            return answer.a1111_error(gateway_status(exc), "InvalidRequest", detail, str(exc))
        text = server_failure(exc, log)  # the client's words name the server's address: the log's alone
        retry = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, ServerUnavailable) else None
        return answer.a1111_error(gateway_status(exc), "HTTPException", text, text, retry)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and the router's own (404, 405)
    async def http_error(_, exc: StarletteHTTPException):
        return answer.a1111_error(exc.status_code, "HTTPException", exc.detail, str(exc.detail)[:1000], exc.headers)

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception):
        error_id = logged(exc)
        return answer.a1111_error(500, "InternalError", "", f"internal error {error_id}: the gateway's log has the "
                                  "details")


def add_generation_routes(app: FastAPI, gateway: Gateway, generations: anyio.CapacityLimiter) -> None:
    """txt2img, img2img and Extras. Generations run on ``generations``' threads; the control routes have
    CONTROL_POOL."""
    client = gateway.client

    def ignored(body: _Request, response: Response) -> None:
        if fields := gateway.ignored_fields(body):
            response.headers["X-Sdtrt-Ignored-Fields"] = header_list(fields)

    @app.post("/sdapi/v1/txt2img", tags=["generation"])
    async def txt2img(body: Txt2ImgBody, response: Response, request: Request,
                      user: str = Depends(current_user)) -> dict[str, Any]:
        ignored(body, response)
        script = find_script(body, TXT2IMG)
        job = gateway.claim("txt2img", body, user)
        call = functools.partial(call_txt2img, client, body.n_iter, body=body)
        work = (lambda: gateway.run(job, body, call)) if script is None else \
            (lambda: gateway.run_script(job, body, script))
        return await until_disconnected(request, job, generations, work, gateway.release)

    @app.post("/sdapi/v1/img2img", tags=["generation"])
    async def img2img(body: Img2ImgBody, response: Response, request: Request,
                      user: str = Depends(current_user)) -> dict[str, Any]:
        ignored(body, response)
        script = find_script(body, IMG2IMG)
        job = gateway.claim("img2img", body, user)
        return await until_disconnected(request, job, generations, lambda: run_img2img(gateway, body, job, script),
                                        gateway.release)

    @app.post("/sdapi/v1/extra-single-image", tags=["generation"])
    def extra_single_image(body: ExtrasSingleImageBody, response: Response,
                           user: str = Depends(current_user)) -> dict[str, Any]:
        """A1111's Extras upscale with sdtrt's upscalers (PIL's, and the upscaler models, run on the server);
        the picture's infotext is kept and A1111's ``postprocessing`` text says what was done."""
        if body.model_extra:
            response.headers["X-Sdtrt-Ignored-Fields"] = header_list(sorted(body.model_extra))
        job = extras_job(body, tuple(gateway.client.upscalers()))
        faces = extras_face_steps(body, tuple(gateway.client.face_restorers()))
        picture = open_image(body.image, "image")
        models = extras_models(gateway, job, user)
        check_extras_size(picture.size, job, models and {n: m.scale for n, m in models.models.items()})
        chunks = {k: v for k, v in picture.info.items() if isinstance(k, str) and isinstance(v, str)}
        result, done = extras_upscale(picture.convert("RGB"), job, models)
        result, faces_done = extras_faces(result, faces, gateway.client.face_networks)
        return answer.extras_response(result, chunks, {**done, **faces_done}, body.show_extras_results)

    @app.post("/sdapi/v1/extra-batch-images", tags=["generation"])
    def extra_batch_images(body: ExtrasBatchBody, response: Response,
                           user: str = Depends(current_user)) -> dict[str, Any]:
        """A1111's Extras on several pictures: each upscaled as extra-single-image does, every size checked before
        any picture is upscaled."""
        if body.model_extra:
            response.headers["X-Sdtrt-Ignored-Fields"] = header_list(sorted(body.model_extra))
        job = extras_job(body, tuple(gateway.client.upscalers()))
        faces = extras_face_steps(body, tuple(gateway.client.face_restorers()))
        models = extras_models(gateway, job, user)
        pictures = [open_image(item.data, f"imageList.{i}.data") for i, item in enumerate(body.imageList)]
        for picture in pictures:
            check_extras_size(picture.size, job, models and {n: m.scale for n, m in models.models.items()})
        results = []
        for picture in pictures:
            chunks = {k: v for k, v in picture.info.items() if isinstance(k, str) and isinstance(v, str)}
            result, done = extras_upscale(picture.convert("RGB"), job, models)
            result, faces_done = extras_faces(result, faces, gateway.client.face_networks)
            results.append(answer.extras_response(result, chunks, {**done, **faces_done}, body.show_extras_results))
        return {"html_info": results[0]["html_info"], "images": [r["image"] for r in results]}


def extras_models(gateway: Gateway, job: ExtrasUpscale, user: str) -> ModelUpscalers | None:
    """The upscaler models an Extras job names, on the server, tiled by the user's ESRGAN_tile/SWIN_tile options."""
    names = [name for name in (job.upscaler_1, job.upscaler_2) if name not in EXTRAS_UPSCALERS]
    return gateway.upscaler_models(names, user) if names else None


def call_txt2img(client: Client, n_iter: int, settings: dict[str, Any], progress, control,
                 body: Txt2ImgBody | None = None) -> Generation:
    """``body``: the request, for its firstpass_image (A1111 reads it only with the hires fix)."""
    if body is not None and body.firstpass_image and body.enable_hr:
        settings = {**settings, "firstpass_image": decode_image(body.firstpass_image, "firstpass_image", "RGB")}
    return client.txt2img(n_iter=n_iter, progress=progress, control=control, **settings)


def call_img2img(client: Client, n_iter: int, settings: dict[str, Any], pictures: tuple, progress,
                 control) -> Generation:
    """``pictures``: the init images, the mask and the latent mask."""
    init, mask, latent_mask = pictures
    return client.img2img(settings.pop("prompt"), init, mask, n_iter=n_iter, progress=progress, control=control,
                          latent_mask=latent_mask, **settings)


def run_img2img(gateway: Gateway, body: Img2ImgBody, job: Job, script: tuple[Script, list[Any]] | None = None
                ) -> dict[str, Any]:
    """img2img: every bound checked before a picture is decoded, then the pictures, then the generation (or the
    script's generations)."""
    settings = gateway.settings(body, job.user)
    background = str(gateway.user(job.user).options.get("img2img_background_color", "#ffffff"))
    init, *masks = img2img_pictures(body, gateway.client.catalog.get(settings["model"]).field("batch_size").maximum,
                                    background)
    if script is not None:
        return gateway.run_script(job, body, script, init, tuple(masks), settings)

    def call(s: dict[str, Any], progress, control) -> Generation:
        return call_img2img(gateway.client, body.n_iter, s, (init, *masks), progress, control)

    return gateway.run(job, body, call, settings)


def add_control_routes(app: FastAPI, gateway: Gateway) -> None:
    """Progress, interrupt, skip and options: each user reaches only their own."""
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

    @app.get("/sdapi/v1/options", tags=["options"])
    @control_route
    def get_options(user: str = Depends(current_user)) -> dict[str, Any]:
        """The caller's options (each user has their own; A1111's are its one user's)."""
        return answer.options_response(gateway.user(user), gateway.current(user))

    @app.post("/sdapi/v1/options", tags=["options"])
    @control_route
    def set_options(options: dict[str, Any] = Body(...), user: str = Depends(current_user)) -> None:
        gateway.set_options(user, options)

    @app.get("/sdapi/v1/progress", tags=["info"])
    @control_route
    def progress(skip_current_image: bool = False, id_task: str | None = None,
                 user: str = Depends(current_user)) -> dict[str, Any]:
        """A1111's progress of the caller's generation under way, step by step (the server's loop posts its
        steps). With several at once: the latest one, or the one ``id_task`` names (the ``force_task_id`` it was
        sent with). Other users' generations are not shown."""
        job = gateway.job(user, id_task)
        try:
            latest = gateway.client.progress(job.control.request_id) if job is not None else None
        except ServerError:  # the job ended (its connection closed) between the lookup and the question
            latest = None
        return answer.progress_response(job, latest, skip_current_image)

    @app.get("/healthz", tags=["info"])
    @control_route
    def healthz() -> JSONResponse:
        """Whether the gateway can serve: 200 when its Triton server answers ready, else 503. Open to anyone
        (Kubernetes' probes): it says nothing but that."""
        ready = gateway.client.is_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)


def add_info_routes(app: FastAPI, gateway: Gateway, metrics_url: str | None, flags: dict[str, Any] | None) -> None:
    """What the server has (samplers, models, LoRAs, ...) in A1111's lists; the refresh routes read its catalog
    again."""
    client = gateway.client
    fixed = {"samplers": answer.sampler_list, "schedulers": answer.scheduler_list,
             "latent-upscale-modes": answer.latent_upscale_modes,
             "upscalers": lambda: answer.upscaler_list(client.catalog),
             "realesrgan-models": lambda: answer.realesrgan_list(client.catalog),
             "scripts": lambda: {tab: script_titles(tab) + alwayson_titles(tab) for tab in (TXT2IMG, IMG2IMG)},
             "script-info": lambda: script_info(list(client.upscalers())) + alwayson_info(client.catalog),
             # What sdtrt has none of, said as A1111 says it: empty lists (clients that list them first keep working)
             "face-restorers": lambda: answer.face_restorer_list(client.catalog),
             **{path: lambda: [] for path in ("hypernetworks", "extensions")},
             "sd-models": lambda: answer.sd_model_list(client.catalog),
             "sd-vae": lambda: answer.vae_list(client.catalog),
             "prompt-styles": lambda: answer.style_list(gateway.styles()),
             "memory": lambda: gateway.memory(metrics_url),
             "cmd-flags": lambda: answer.public_flags(flags)}
    for path, make in fixed.items():
        app.add_api_route(f"/sdapi/v1/{path}", make, methods=["GET"], tags=["info"])
    for path in ("refresh-loras", "refresh-embeddings", "refresh-checkpoints", "refresh-vae"):
        # what the server's catalog registers now (its models, their LoRAs, embeddings and VAEs)
        app.add_api_route(f"/sdapi/v1/{path}", lambda: client.refresh(), methods=["POST"], tags=["options"])

    @app.get("/sdapi/v1/loras", tags=["info"])
    def loras(user: str = Depends(current_user)) -> list[dict[str, Any]]:
        """The current model's registered LoRAs; a prompt uses one with <lora:name:weight>."""
        return answer.lora_list(gateway.current(user))

    @app.get("/sdapi/v1/embeddings", tags=["info"])
    def embeddings(user: str = Depends(current_user)) -> dict[str, Any]:
        return answer.embedding_list(gateway.current(user))

    @app.post("/sdapi/v1/interrogate", tags=["generation"])
    def interrogate(body: dict[str, Any] = Body(...), user: str = Depends(current_user)) -> dict[str, Any]:
        """A1111's interrogation of a picture by the user's options: the CLIP interrogator's (BLIP's caption and
        CLIP's best lines of each category) or DeepBooru's tags."""
        model = body.get("model", "clip")
        return {"caption": gateway.interrogate(decode_image(body.get("image") or "", "image", "RGB"), str(model),
                                               user)}

    @app.post("/sdapi/v1/png-info", tags=["info"])
    def png_info_endpoint(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return answer.png_info_response(body.get("image"))
