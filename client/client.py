"""A thin client over tritonclient for the ``txt2img`` and ``img2img`` models, over gRPC or HTTP, from threads or asyncio.

    from sdtrt.client import Client
    client = Client("localhost:8001")                      # or Client("localhost:8000", protocol="http")
    result = client.txt2img("a red fox in snow", seed=42, steps=20, sampler="DPM++ 2M Karras")
    result.images[0]      # H x W x 3 uint8
    result.infotexts[0]   # AUTOMATIC1111 infotext, with that image's seed

The client reads the model's spec from the server (the ``txt2img`` model's ``sdtrt_spec`` parameter), so defaults and
limits are the served model's own, and a bad setting is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from PIL import Image

from sdtrt.contract.errors import InvalidRequest, SdtrtError
from sdtrt.contract.spec import (
    DEFAULT_PORTS,
    controlnet_image,
    controlnet_mask,
    IMAGES,
    INFOTEXTS,
    IMG2IMG,
    INIT_IMAGE,
    FIRSTPASS_IMAGE,
    LATENT_MASK,
    MASK,
    MODEL,
    PROGRESS,
    PROGRESS_PREVIEW,
    PROGRESS_REQUEST_ID,
    PROGRESS_STEP,
    PROGRESS_TOTAL,
    SEEDS,
    SPEC_PARAMETER,
    TXT2IMG,
    WIRE_DTYPES,
    BLIP_DECODER,
    BLIP_VISION,
    CAPTION_TOKENS,
    CLIP_IMAGE,
    CLIP_INTERROGATOR,
    CLIP_TEXT,
    CLIP_TEXTS_A_CALL,
    Catalog,
    ModelSpec,
    interrogator_component,
)
from sdtrt.requests.generation import Generation, batch_count, concatenate, one_per_image
from sdtrt.postprocessing.clip_interrogate import (CachedFeatures, ClipInterrogatorOptions, ClipNetworks,
                                                   clip_interrogate)
from sdtrt.postprocessing.faces import FaceNetworks, face_networks
from sdtrt.postprocessing.interrogate import DEEPBOORU, DeepBooruOptions, deepbooru_tags
from sdtrt.postprocessing.model_upscale import ModelUpscaler, model_upscaler
from sdtrt.requests.plan import validate
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest, pixel_steps, resolve_seeds

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {protocol: f"localhost:{DEFAULT_PORTS[protocol]}" for protocol in ("grpc", "http")}


PROGRESS_TIMEOUT_S = 10.0  # a progress question is answered in milliseconds; a hung server must not hold its asker
CATALOG_TIMEOUT_S = 30.0  # so is the catalog (a model config), but a server still loading its models answers slower


class ServerError(SdtrtError):
    """The server refused or failed a request; the message is the server's own."""


class ServerRefused(ServerError):
    """The server judged the request invalid (Triton's INVALID_ARG: gRPC INVALID_ARGUMENT, HTTP 400), whichever of
    its models ran the check; the message names the field and what it must be."""


class ServerUnavailable(ServerError):
    """The server cannot run the request now (Triton's UNAVAILABLE, HTTP 503): a stage is being restarted, or its
    queue is full. The same request may succeed later."""

    retry_after_s = 30


class ServerBusy(ServerUnavailable):
    """The job's queue on the server is full: the same request may succeed in a few seconds."""

    retry_after_s = 5


def _module(protocol: str, aio: bool = False):
    if protocol == "grpc":
        # only the protocol this client speaks (each loads its own stack)
        import tritonclient.grpc as sync_mod
        import tritonclient.grpc.aio as aio_mod
    elif protocol == "http":
        # (likewise)
        import tritonclient.http as sync_mod
        import tritonclient.http.aio as aio_mod
    else:
        raise SdtrtError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return aio_mod if aio else sync_mod


@dataclass(frozen=True)
class Progress:
    """A running request's denoising progress as its server loop last posted it."""

    step: int  # steps done
    total: int  # steps of the pass under way (a hires fix counts its own)
    preview: np.ndarray | None  # (h, w, 3) uint8 at the latents' resolution, the batch as a grid; None: none yet


class JobControl:
    """Stops a generation from another thread, as A1111's Interrupt and Skip buttons: ``interrupt()`` ends it
    (the batches already done are returned), ``skip()`` drops the batch running now and goes on with the next.
    Over gRPC the server's loop stops within one step; over HTTP (Triton does not cancel HTTP requests) the
    running batch finishes first."""

    def __init__(self, request_id: str | None = None):
        """``request_id`` names the job's requests to the server (default: a fresh one); ``Client.progress``
        reads their steps by it."""
        self.request_id = request_id or uuid.uuid4().hex
        self.interrupted = False
        self._skip_batch = -1
        self._batch = 0
        self._changed = threading.Event()

    def interrupt(self) -> None:
        self.interrupted = True
        self._changed.set()

    def skip(self) -> None:
        self._skip_batch = self._batch
        self._changed.set()

    def next_generation(self) -> None:
        """A new generation of the same job starts (an A1111 script's next one): a skip of the last one's batch
        does not carry over to this one's batch of the same number."""
        self._skip_batch = -1

    def _stop_current(self) -> bool:
        return self.interrupted or self._skip_batch == self._batch


class Stopped(Exception):
    """The running batch was interrupted or skipped (``JobControl``)."""


class Client:
    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float | None = 600.0,
                 min_timeout: float = 120.0):
        """``timeout``: what the largest request may take; each request gets its share (``deadline``)."""
        self.protocol = protocol
        _module(protocol)  # fail early on a bad protocol name
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout = timeout
        self.min_timeout = min_timeout
        self._local = threading.local()  # tritonclient's HTTP client is not thread-safe: one per thread
        self._catalog: Catalog | None = None
        # A job sent with a JobControl over gRPC gets a connection of its own, found here by request id: behind
        # a Kubernetes Service each new connection may land on another server (so jobs spread over the pods),
        # and the job's progress must be asked of the server that runs it (progress lives in its memory).
        self._job_connections: dict[str, Any] = {}
        self._job_lock = threading.Lock()
        self._clip_texts: dict[tuple[str, str], CachedFeatures] = {}  # (model, its CLIP text network's hash)

    # --- connections -------------------------------------------------------------------------------------------
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
        return client

    def _new_client(self, aio: bool = False, own_connection: bool = False,
                    network_timeout: float | None = CATALOG_TIMEOUT_S):
        """``network_timeout``: an HTTP connection's deadline for each answer (the shared one's: the longest
        question asked on it, the catalog; a generation's connection: that generation's deadline)."""
        module = _module(self.protocol, aio)
        if own_connection and self.protocol == "grpc" and not aio:
            # gRPC shares one TCP connection between channels to the same address unless told not to
            keepalive = module.KeepAliveOptions()
            return module.InferenceServerClient(self.url, channel_args=[
                ("grpc.max_send_message_length", module.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", module.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                ("grpc.use_local_subchannel_pool", 1)])
        if self.protocol == "http":
            # tritonclient's HTTP clients take no deadline per call (infer's ``timeout`` is a server-side queue
            # timeout, in microseconds, for dynamically batched models only): the connection's timeout is it
            if aio:
                return module.InferenceServerClient(self.url, conn_timeout=network_timeout)
            return module.InferenceServerClient(self.url, network_timeout=network_timeout)
        return module.InferenceServerClient(self.url)

    def _error(self, exc: Exception) -> ServerError:
        message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
        status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
        if status in ("StatusCode.UNAVAILABLE", "503") and "queue" in (message or ""):
            return ServerBusy(f"{self.url} ({self.protocol}): the server is busy (its queue for this job is full); "
                              f"retry in a few seconds. Server said: {message}")
        if status in ("StatusCode.UNAVAILABLE", "503") or ("Stub process" in (message or "")
                                                          and "not healthy" in (message or "")):
            # (the second: a job whose own stub was killed as hung answers INTERNAL with Triton's words)
            return ServerUnavailable(f"{self.url} ({self.protocol}): {message}")
        if status in ("StatusCode.INVALID_ARGUMENT", "400"):
            return ServerRefused(message or "")
        if status == "StatusCode.DEADLINE_EXCEEDED" or "timed out" in (message or "").lower():
            return ServerUnavailable(f"{self.url} ({self.protocol}): no answer within the request's deadline (see "
                                     f"Client.deadline): the server is overloaded or a stage hung; try again. ({message})")
        return ServerError(f"{self.url} ({self.protocol}): {message}")

    def is_ready(self) -> bool:
        try:
            # a bounded question: a hung server answers "not ready", not never
            kwargs = {"client_timeout": 5.0} if self.protocol == "grpc" else {}
            return (bool(self._client().is_server_ready(**kwargs))
                    and bool(self._client().is_model_ready(TXT2IMG, **kwargs)))
        except Exception:
            return False

    @property
    def catalog(self) -> Catalog:
        """Every model the server has (their specs), and its default."""
        if self._catalog is None:
            self._catalog = self._fetch_catalog()
        return self._catalog

    @property
    def spec(self) -> ModelSpec:
        """The default model's spec."""
        return self.catalog.get()

    @property
    def models(self) -> list[str]:
        return list(self.catalog.models)

    def refresh(self) -> Catalog:
        """Read the server's models again (after an export added one and the server reloaded the jobs)."""
        self._catalog = None
        return self.catalog

    def model_spec(self, model: str | None = None) -> ModelSpec:
        """``model``'s spec (default: the server's default model); a name this client has not seen yet is looked
        up again on the server, which may have had it added since (`sdtrt models load`)."""
        try:
            return self.catalog.get(model)
        except InvalidRequest:
            return self.refresh().get(model)

    def _registered(self, kind: str) -> dict[str, ModelSpec]:
        """The models of a spec registry (``upscalers``, ``face_restorers``) across the server's models, each with
        the model it is one of (the first that has it)."""
        found: dict[str, ModelSpec] = {}
        for spec in self.catalog.models.values():
            for name in getattr(spec, kind):
                found.setdefault(name, spec)
        return found

    def controlnets(self) -> list[str]:
        """The ControlNets of the server's models by A1111's name ("stem [hash]"), each once, in order."""
        return list(dict.fromkeys(entry["title"] for spec in self.catalog.models.values()
                                  for entry in spec.controlnets.values()))

    def upscalers(self) -> dict[str, ModelSpec]:
        """The upscaler models the server's models were exported with (--upscalers)."""
        return self._registered("upscalers")

    def face_restorers(self) -> dict[str, ModelSpec]:
        """The face restorers (GFPGAN, CodeFormer) the server's models were exported with (--face-restorers)."""
        return self._registered("face_restorers")

    def interrogators(self) -> dict[str, ModelSpec]:
        """The interrogators (deepdanbooru) the server's models were exported with (--interrogators)."""
        return self._registered("interrogators")

    def interrogate(self, image: Image.Image, model: str = DEEPBOORU, options: dict[str, Any] | None = None) -> str:
        """A1111's interrogation of a picture on the server's networks: DeepBooru's tags, or the CLIP interrogator's
        BLIP caption and CLIP-ranked lines, by A1111's options (``options``: its keys; missing ones its defaults)."""
        found = self.interrogators()
        if model not in found:
            have = ", ".join(repr(name) for name in found) or "none: export a model with --interrogators DIR"
            raise InvalidRequest("model", model, f"an interrogator this server has ({have})")
        spec, options = found[model], options or {}
        if model == CLIP_INTERROGATOR:
            entry = spec.interrogators[model]
            checked = ClipInterrogatorOptions.of(options, spec.dims[CAPTION_TOKENS].max)
            return clip_interrogate(image, self._clip_networks(spec), entry, checked)
        component = spec.component(interrogator_component(model))

        def run(array: np.ndarray) -> np.ndarray:
            return self._network(spec, component.name, [array])[component.outputs[0].name]

        return deepbooru_tags(image, run, spec.interrogators[model]["tags"], DeepBooruOptions.of(options))

    def _clip_networks(self, spec: ModelSpec) -> ClipNetworks:
        """The CLIP interrogator's networks on the server; CLIP's text features kept once computed (per model)."""
        def network(name: str) -> Callable[..., np.ndarray]:
            component = spec.component(interrogator_component(name))
            return lambda *arrays: self._network(spec, component.name, list(arrays))[component.outputs[0].name]

        text = interrogator_component(CLIP_TEXT)
        with self._job_lock:
            key = (spec.key, spec.interrogators[CLIP_INTERROGATOR]["networks"][text])
            texts = self._clip_texts.setdefault(key, CachedFeatures(network(CLIP_TEXT), CLIP_TEXTS_A_CALL))
        return ClipNetworks(network(BLIP_VISION), network(BLIP_DECODER), network(CLIP_IMAGE), texts)

    def _network(self, spec: ModelSpec, name: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """One of a model's networks on the server: its inputs in the spec's order, its outputs by name."""
        module, component = _module(self.protocol), spec.component(name)
        # (a per-row scalar, such as CodeFormer's weight, travels as [rows, 1]: model_repository.configs)
        inputs = [self._tensor(module, t.name, np.ascontiguousarray(a.reshape(-1, 1) if len(t.shape) == 1 else a,
                                                                    t.dtype), WIRE_DTYPES[t.dtype])
                  for t, a in zip(component.inputs, arrays)]
        outputs = [module.InferRequestedOutput(t.name) for t in component.outputs]
        try:
            response = self._client().infer(spec.triton_name(name), inputs, outputs=outputs)
        except Exception as exc:
            raise self._error(exc) from None
        return {t.name: response.as_numpy(t.name) for t in component.outputs}

    def face_networks(self, restorer: str, weight: float = 0.5) -> FaceNetworks:
        """A registered face restorer with its face detector and parser, whose networks run on the server."""
        spec = self.face_restorers()[restorer]
        return face_networks(spec, restorer, weight, lambda name, arrays: self._network(spec, name, arrays))

    def upscaler(self, name: str) -> ModelUpscaler:
        """A registered upscaler model whose network runs on the server: tiles in, upscaled tiles out."""
        spec = self.upscalers()[name]
        return model_upscaler(spec, name, lambda component, arrays: self._network(spec, component, arrays))

    def _fetch_catalog(self) -> Catalog:
        try:
            # bounded: a hung server fails the question (HTTP: the shared connection's timeout, CATALOG_TIMEOUT_S)
            bounded = {"as_json": True, "client_timeout": CATALOG_TIMEOUT_S} if self.protocol == "grpc" else {}
            config = self._client().get_model_config(TXT2IMG, **bounded)
        except Exception as exc:
            raise ServerError(
                f"cannot reach the {TXT2IMG} model at {self.url} ({self.protocol}): {exc}. "
                "Is `sdtrt serve` running, and is this its gRPC (--grpc-port) or HTTP (--http-port) port?"
            ) from None
        config = config.get("config", config)
        return Catalog.from_json(json.loads(config["parameters"][SPEC_PARAMETER]["string_value"]))

    # --- requests ----------------------------------------------------------------------------------------------
    def request(self, prompt: str, request_type: type = Txt2ImgRequest, model: str | None = None,
                **settings: Any) -> Txt2ImgRequest:
        """A validated request with the model's defaults filled in and -1 seeds picked (raises InvalidRequest).
        ``model``: which of the server's models (default: its default).

        Seeds are picked here rather than on the server so that the infotext can name the variation seed too.
        """
        return resolve_seeds(validate(request_type(prompt=prompt, **settings), self.model_spec(model)))

    def _inputs(self, module, spec: ModelSpec, request: Txt2ImgRequest, images: dict[str, np.ndarray]) -> list:
        inputs = [self._tensor(module, MODEL, np.array([spec.key.encode()], dtype=np.object_), "BYTES")]
        for name, value in request.as_dict().items():
            field = spec.field(name)
            string = field.dtype == "string"
            array = np.array([value.encode("utf-8") if string else value], dtype=np.object_ if string else field.dtype)
            inputs.append(self._tensor(module, name, array, WIRE_DTYPES[field.dtype]))
        for name, array in images.items():
            inputs.append(self._tensor(module, name, np.ascontiguousarray(array, dtype=np.uint8), "UINT8"))
        return inputs

    @staticmethod
    def _tensor(module, name: str, array: np.ndarray, wire: str):
        tensor = module.InferInput(name, list(array.shape), wire)
        tensor.set_data_from_numpy(array)
        return tensor

    @staticmethod
    def _result(response) -> Generation:
        """The pictures, their seeds and the infotexts the job model wrote from the plan it ran."""
        images = response.as_numpy(IMAGES)
        seeds = [int(s) for s in response.as_numpy(SEEDS)]
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in response.as_numpy(INFOTEXTS)]
        return Generation(images, seeds, texts)

    def deadline(self, spec: ModelSpec, request: Txt2ImgRequest) -> float | None:
        """Seconds a generation may take before the client gives up (UNAVAILABLE): ``min_timeout`` (queueing and
        start-up) plus ``timeout`` scaled by the request's share of the largest request the server takes (its
        pixel-steps against the spec's ceiling), at most ``timeout``. A small request on a hung server fails in
        minutes, not after the largest request's allowance."""
        if self.timeout is None:
            return None
        if not spec.max_pixel_steps:
            return self.timeout

        work = pixel_steps(request, spec)[0] / spec.max_pixel_steps
        return min(self.timeout, self.min_timeout + self.timeout * work)

    def _infer_kwargs(self, module, deadline: float | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"outputs": [module.InferRequestedOutput(name) for name in (IMAGES, SEEDS, INFOTEXTS)]}
        if deadline is not None and self.protocol == "grpc":
            kwargs["client_timeout"] = deadline  # (HTTP: the deadline is its connection's timeout, _http_infer)
        return kwargs

    def _generate(self, job: str, spec: ModelSpec, request: Txt2ImgRequest,
                  images: dict[str, np.ndarray], control: JobControl | None = None) -> Generation:
        module = _module(self.protocol)
        inputs = self._inputs(module, spec, request, images)
        deadline = self.deadline(spec, request)
        kwargs = self._infer_kwargs(module, deadline)
        if control is not None:
            kwargs["request_id"] = control.request_id  # the job model posts its steps under it (progress)
        try:
            if self.protocol == "http":
                response = self._http_infer(job, inputs, kwargs, deadline)
            elif control is None:
                response = self._client().infer(job, inputs, **kwargs)
            else:
                connection = self._job_connections.get(control.request_id) or self._client()
                response = self._cancellable_infer(connection, job, inputs, kwargs, control)
        except Stopped:
            raise
        except Exception as exc:
            raise self._error(exc) from None
        return self._result(response)

    def _http_infer(self, job: str, inputs: list, kwargs: dict[str, Any], deadline: float | None):
        """HTTP infer within ``deadline``: on a connection of its own whose timeout is the deadline (one
        connection a generation: nothing next to a generation's seconds)."""
        client = self._new_client(network_timeout=deadline)
        try:
            return client.infer(job, inputs, **kwargs)
        finally:
            client.close()

    def _cancellable_infer(self, connection, job: str, inputs: list, kwargs: dict[str, Any], control: JobControl):
        """gRPC infer that ``control`` can cancel: Triton hands the cancellation to the job model, whose loop
        stops at its next step."""
        done, box = threading.Event(), {}

        def callback(result, error) -> None:
            box.update(result=result, error=error)
            done.set()

        call = connection.async_infer(job, inputs, callback, **kwargs)
        while not done.wait(0.05):
            if control._stop_current():
                call.cancel()
                done.wait(10)
                raise Stopped()
        if box["error"] is not None:
            raise box["error"]
        return box["result"]

    def progress(self, request_id: str) -> Progress | None:
        """The progress of the request sent under ``request_id`` (a JobControl's), as the server's loop last
        posted it; None before its first step or for an unknown id."""
        module = _module(self.protocol)
        inputs = [self._tensor(module, PROGRESS_REQUEST_ID, np.array([request_id.encode()], dtype=np.object_), "BYTES")]
        own = self._job_connections.get(request_id)
        bounded = {"client_timeout": PROGRESS_TIMEOUT_S} if self.protocol == "grpc" else {}
        try:
            response = (own or self._client()).infer(PROGRESS, inputs, **bounded)
        except Exception as exc:
            if own is None or self._job_connections.get(request_id) is own:
                raise self._error(exc) from None
            # the job ended and closed its own connection while this question was on it: ask on the shared one
            try:
                response = self._client().infer(PROGRESS, inputs, **bounded)
            except Exception as again:
                raise self._error(again) from None
        done, total = int(response.as_numpy(PROGRESS_STEP)[0]), int(response.as_numpy(PROGRESS_TOTAL)[0])
        preview = response.as_numpy(PROGRESS_PREVIEW)  # None from a server of an sdtrt without previews
        return None if done < 0 else Progress(done, total, preview if preview is not None and preview.size else None)

    async def _agenerate(self, job: str, spec: ModelSpec, request: Txt2ImgRequest,
                         images: dict[str, np.ndarray]) -> Generation:
        module = _module(self.protocol)
        deadline = self.deadline(spec, request)
        client = self._new_client(aio=True, network_timeout=deadline)
        try:
            response = await client.infer(job, self._inputs(module, spec, request, images),
                                          **self._infer_kwargs(module, deadline))
        except TimeoutError:  # aiohttp's deadline is a bare TimeoutError, without words for _error to read
            raise self._error(TimeoutError(f"timed out after {deadline:.0f} s")) from None
        except Exception as exc:
            raise self._error(exc) from None
        finally:
            await client.close()
        return self._result(response)

    # --- the jobs ----------------------------------------------------------------------------------------------
    def _batches(self, job: str, spec: ModelSpec, request: Txt2ImgRequest,
                 images: dict[str, np.ndarray] | list[dict[str, np.ndarray]], n_iter: int,
                 progress: Callable[[int, int], None] | None, control: JobControl | None = None) -> Generation:
        """A1111's batch count: ``n_iter`` batches one after another. ``images``: the pictures every image of the
        batch starts from, or one set per image (img2img with several init images: one request per image)."""
        results = []
        own = control is not None and self.protocol == "grpc"
        if own:
            with self._job_lock:
                self._job_connections[control.request_id] = self._new_client(own_connection=True)
        try:
            for number, batch in enumerate(batch_count(request, n_iter)):
                if control is not None:
                    if control.interrupted:
                        break
                    control._batch = number
                try:
                    if isinstance(images, dict):
                        results.append(self._generate(job, spec, batch, images, control))
                    elif len(images) == 1:
                        results.append(self._generate(job, spec, batch, images[0], control))
                    else:
                        results.append(concatenate([self._generate(job, spec, one, pictures, control)
                                                    for one, pictures in zip(one_per_image(batch), images)]))
                except Stopped:
                    pass  # interrupted (the loop above ends) or skipped (on to the next batch)
                if progress is not None:
                    progress(number + 1, n_iter)
        finally:
            if own:
                with self._job_lock:
                    connection = self._job_connections.pop(control.request_id, None)
                if connection is not None:
                    connection.close()
        if not results:  # interrupted or skipped before any batch was done
            channels = spec.component("vae_decoder").outputs[0].shape[1]
            return Generation(np.zeros((0, request.height, request.width, channels), np.uint8), [], [])
        return concatenate(results)

    def txt2img(self, prompt: str = "", n_iter: int = 1, progress: Callable[[int, int], None] | None = None,
                model: str | None = None, control: JobControl | None = None, **settings: Any) -> Generation:
        """Generate images with ``model`` (one of :attr:`models`; default: the server's default); settings are
        the request fields (``sdtrt txt2img --url URL --help`` lists them with their ranges: negative_prompt,
        seed, steps, guidance_scale, sampler, schedule_type, width, height, batch_size, clip_skip, subseed,
        subseed_strength, enable_hr, hr_scale, hr_upscaler, ...). ``n_iter`` batches run one after another with
        continuing seeds (A1111's batch count); ``progress(done, n_iter)`` follows them; ``control`` (a
        JobControl) can interrupt or skip from another thread. ``firstpass_image=`` (with enable_hr): the hires
        fix starts from this picture instead of drawing its first pass (A1111's)."""
        spec = self.model_spec(model)
        firstpass = settings.pop("firstpass_image", None)  # a picture beside the fields
        controls = control_inputs(settings)
        request = self.request(prompt, model=spec.key, **settings)
        images = {} if firstpass is None else {FIRSTPASS_IMAGE: _array(firstpass, "RGB")}
        return self._batches(TXT2IMG, spec, request, {**images, **controls}, n_iter, progress, control)

    def img2img(self, prompt: str, init_image: Any, mask: Any = None, n_iter: int = 1,
                progress: Callable[[int, int], None] | None = None, model: str | None = None,
                control: JobControl | None = None, **settings: Any) -> Generation:
        """Redraw ``init_image`` (PIL image or H x W x 3 uint8 array); with ``mask`` (white = repaint), inpaint.
        Settings as for txt2img plus denoising_strength, resize_mode, mask_blur, inpaint_full_res(_padding),
        inpainting_fill, mask_round; ``latent_mask=`` another mask for the latents' blending (A1111's).

        A list of several init images works as in A1111: at most ``batch_size`` of them, and the batch becomes one
        picture per init image (image i from init i, with seed + i)."""
        spec = self.model_spec(model)
        latent_mask = settings.pop("latent_mask", None)  # a picture beside the fields
        controls = control_inputs(settings)
        request = self.request(prompt, Img2ImgRequest, model=spec.key, **settings)
        inits = list(init_image) if isinstance(init_image, (list, tuple)) else [init_image]
        if not inits or len(inits) > request.batch_size:
            raise InvalidRequest("init_image", f"<{len(inits)} pictures>",
                                 f"1 to batch_size ({request.batch_size}) pictures: A1111 redraws one per image of "
                                 f"the batch, so at most {request.batch_size} here")
        if len(inits) > 1:
            request = replace(request, batch_size=len(inits))
        pictures = [{**_pictures(init, mask, latent_mask), **controls} for init in inits]
        return self._batches(IMG2IMG, spec, request, pictures, n_iter, progress, control)

    async def atxt2img(self, prompt: str, n_iter: int = 1, model: str | None = None, **settings: Any) -> Generation:
        """The asyncio form of :meth:`txt2img` (tritonclient's aio clients, one per call)."""
        await self._acatalog()
        spec = self.model_spec(model)
        firstpass = settings.pop("firstpass_image", None)  # a picture beside the fields
        controls = control_inputs(settings)
        request = self.request(prompt, model=spec.key, **settings)
        images = {**({} if firstpass is None else {FIRSTPASS_IMAGE: _array(firstpass, "RGB")}), **controls}
        return concatenate([await self._agenerate(TXT2IMG, spec, r, images) for r in batch_count(request, n_iter)])

    async def aimg2img(self, prompt: str, init_image: Any, mask: Any = None, n_iter: int = 1, model: str | None = None,
                       **settings: Any) -> Generation:
        await self._acatalog()
        spec = self.model_spec(model)
        latent_mask = settings.pop("latent_mask", None)  # a picture beside the fields
        controls = control_inputs(settings)
        request = self.request(prompt, Img2ImgRequest, model=spec.key, **settings)
        images = {**_pictures(init_image, mask, latent_mask), **controls}
        return concatenate([await self._agenerate(IMG2IMG, spec, r, images) for r in batch_count(request, n_iter)])

    async def _acatalog(self) -> None:
        if self._catalog is None:
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.catalog)

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _array(picture: Any, mode: str) -> np.ndarray:
    """A PIL image or array -> the uint8 array a job model takes (RGB H x W x 3, a mask H x W)."""
    if isinstance(picture, Image.Image):
        picture = picture.convert(mode)
    return np.asarray(picture)


def control_inputs(settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """``settings``' ControlNet units (``controlnet=``: a list of dicts of sd-webui-controlnet's unit settings, each
    with its ``image`` and optional ``mask``, a PIL image or array) taken out: their settings become the
    ``controlnet_units`` field, their pictures the job's inputs (returned by name)."""
    units = settings.pop("controlnet", None)
    if not units:
        return {}
    own, pictures = [], {}
    for index, unit in enumerate(units):
        unit = dict(unit)
        image, mask = unit.pop("image", None), unit.pop("mask", None)
        if image is not None:
            pictures[controlnet_image(index)] = _array(image, "RGB")
        if mask is not None:
            pictures[controlnet_mask(index)] = _array(mask, "L")
        own.append(unit)
    settings["controlnet_units"] = json.dumps(own)
    return pictures


def _pictures(init_image: Any, mask: Any, latent_mask: Any = None) -> dict[str, np.ndarray]:
    """The img2img model's pictures: the init image, and the masks where given."""
    images = {INIT_IMAGE: _array(init_image, "RGB")}
    if mask is not None:
        images[MASK] = _array(mask, "L")
    if latent_mask is not None:
        images[LATENT_MASK] = _array(latent_mask, "L")
    return images
