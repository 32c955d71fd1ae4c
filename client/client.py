"""A thin client over tritonclient for the ``txt2img`` ensemble, over gRPC or HTTP, from threads or asyncio.

    from sdtrt.client import Client
    client = Client("localhost:8001")                      # or Client("localhost:8000", protocol="http")
    result = client.txt2img("a red fox in snow", seed=42, steps=20, sampler="DPM++ 2M Karras")
    result.images[0]      # H x W x 3 uint8
    result.infotexts[0]   # AUTOMATIC1111 infotext, with that image's seed

The client reads the model's spec from the server (the ensemble's ``sdtrt_spec`` parameter), so defaults and
limits are the served model's own, and a bad setting is refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace
from typing import Any

import numpy as np

from sdtrt.errors import SdtrtError
from sdtrt.generation import Generation, batch_count, concatenate, infotexts
from sdtrt.model_repository.configs import IMAGES, PIPELINE, SEEDS
from sdtrt.request import Txt2ImgRequest, resolve_seeds, validate
from sdtrt.spec import ModelSpec

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
_NUMPY = {"string": np.object_, "int64": np.int64, "int32": np.int32, "float32": np.float32}
_WIRE = {"string": "BYTES", "int64": "INT64", "int32": "INT32", "float32": "FP32"}


class ServerError(SdtrtError):
    """The server refused or failed a request; the message is the server's own."""


def _module(protocol: str, aio: bool = False):
    if protocol == "grpc":
        import tritonclient.grpc as sync_mod
        import tritonclient.grpc.aio as aio_mod
    elif protocol == "http":
        import tritonclient.http as sync_mod
        import tritonclient.http.aio as aio_mod
    else:
        raise SdtrtError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return aio_mod if aio else sync_mod


class Client:
    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float | None = 600.0):
        self.protocol = protocol
        _module(protocol)  # fail early on a bad protocol name
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout = timeout
        self._local = threading.local()  # tritonclient's HTTP client is not thread-safe: one per thread
        self._spec: ModelSpec | None = None

    # --- connections -------------------------------------------------------------------------------------------
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
        return client

    def _new_client(self, aio: bool = False):
        module = _module(self.protocol, aio)
        if self.protocol == "http" and not aio and self.timeout is not None:
            # its default network_timeout (60 s) would cut long generations short
            return module.InferenceServerClient(self.url, network_timeout=self.timeout)
        return module.InferenceServerClient(self.url)

    def _error(self, exc: Exception) -> ServerError:
        message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
        return ServerError(f"{self.url} ({self.protocol}): {message}")

    def is_ready(self) -> bool:
        try:
            return bool(self._client().is_server_ready()) and bool(self._client().is_model_ready(PIPELINE))
        except Exception:
            return False

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            self._spec = self._fetch_spec()
        return self._spec

    def _fetch_spec(self) -> ModelSpec:
        try:
            config = self._client().get_model_config(PIPELINE, **({"as_json": True} if self.protocol == "grpc" else {}))
        except Exception as exc:
            raise ServerError(
                f"cannot reach the {PIPELINE} model at {self.url} ({self.protocol}): {exc}. "
                "Is `sdtrt serve` running, and is this its gRPC (8001) or HTTP (8000) port?"
            ) from None
        config = config.get("config", config)
        return ModelSpec.from_json(json.loads(config["parameters"]["sdtrt_spec"]["string_value"]))

    # --- requests ----------------------------------------------------------------------------------------------
    def request(self, prompt: str, **settings: Any) -> Txt2ImgRequest:
        """A validated request with the served model's defaults filled in and -1 seeds picked (raises InvalidRequest).

        Seeds are picked here rather than on the server so that the infotext can name the variation seed too.
        """
        return resolve_seeds(validate(Txt2ImgRequest(prompt=prompt, **settings), self.spec))

    def _inputs(self, module, request: Txt2ImgRequest) -> list:
        inputs = []
        for name, value in request.as_dict().items():
            field = self.spec.field(name)
            array = np.array([value.encode("utf-8") if field.dtype == "string" else value], dtype=_NUMPY[field.dtype])
            tensor = module.InferInput(name, [1], _WIRE[field.dtype])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def _outputs(self, module) -> list:
        return [module.InferRequestedOutput(IMAGES), module.InferRequestedOutput(SEEDS)]

    def _result(self, request: Txt2ImgRequest, response) -> Generation:
        images = response.as_numpy(IMAGES)
        seeds = [int(s) for s in response.as_numpy(SEEDS)]
        request = replace(request, seed=seeds[0])
        return Generation(images, seeds, infotexts(request, seeds, self.spec.model_name, self.spec.model_hash))

    def _timeout_kwargs(self) -> dict[str, Any]:
        if self.timeout is None:
            return {}
        # gRPC takes client_timeout in seconds; the HTTP client's network_timeout is set on the connection.
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def txt2img(self, prompt: str, n_iter: int = 1, **settings: Any) -> Generation:
        """Generate images; settings are the request fields (negative_prompt, seed, steps, guidance_scale, sampler,
        schedule_type, width, height, batch_size, clip_skip, subseed, subseed_strength). ``n_iter`` batches run
        one after another with continuing seeds (A1111's batch count)."""
        request = self.request(prompt, **settings)
        return concatenate([self._generate(r) for r in batch_count(request, n_iter)])

    def _generate(self, request: Txt2ImgRequest) -> Generation:
        module = _module(self.protocol)
        try:
            response = self._client().infer(PIPELINE, self._inputs(module, request), outputs=self._outputs(module),
                                            **self._timeout_kwargs())
        except Exception as exc:
            raise self._error(exc) from None
        return self._result(request, response)

    async def atxt2img(self, prompt: str, n_iter: int = 1, **settings: Any) -> Generation:
        """The asyncio form of :meth:`txt2img` (tritonclient's aio clients, one per call)."""
        if self._spec is None:
            await asyncio.get_running_loop().run_in_executor(None, lambda: self.spec)
        request = self.request(prompt, **settings)
        return concatenate([await self._agenerate(r) for r in batch_count(request, n_iter)])

    async def _agenerate(self, request: Txt2ImgRequest) -> Generation:
        module = _module(self.protocol)
        client = self._new_client(aio=True)
        try:
            response = await client.infer(PIPELINE, self._inputs(module, request), outputs=self._outputs(module),
                                          **self._timeout_kwargs())
        except Exception as exc:
            raise self._error(exc) from None
        finally:
            await client.close()
        return self._result(request, response)

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
