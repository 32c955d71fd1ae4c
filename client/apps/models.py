"""A server's models: which it has (its catalog), which are loaded, loading and unloading one without a restart.

A model is its own Triton models (``<name>__tokenizer`` and its networks); the job models (txt2img, img2img) serve
every model and stay. Loading and unloading go through Triton's model control API, which `sdtrt serve` enables
(explicit model-control mode) and restricts to requests with its control key (sdtrt.model_repository.serving.control).
"""

from __future__ import annotations

import time
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sdtrt.client import Client
from sdtrt.contract.errors import SdtrtError, UsageError
from sdtrt.contract.spec import IMG2IMG, TXT2IMG, Catalog, ModelSpec
from sdtrt.model_repository.serving.control import ControlKey, resolve_key


def triton_models(spec: ModelSpec) -> list[str]:
    return [spec.triton_name("tokenizer"), *(spec.triton_name(name) for name in spec.components)]


class ModelControl:
    def __init__(self, url: str, key: ControlKey | Path | None = None):
        """``key``: the server's control key, or the file holding it (default: as `sdtrt serve` finds it)."""
        self.client = Client(url)
        self.triton = grpcclient.InferenceServerClient(url)
        self._key = key

    @property
    def key(self) -> ControlKey:
        """Read when first needed: listing models needs no key, loading and unloading do."""
        if not isinstance(self._key, ControlKey):
            self._key = resolve_key(self._key)
        return self._key

    def catalog(self) -> Catalog:
        return self.client.refresh()

    def spec(self, name: str) -> ModelSpec:
        try:
            return self.catalog().get(name)
        except UsageError as exc:
            raise UsageError(str(exc)) from None

    def is_loaded(self, spec: ModelSpec) -> bool:
        return all(self.triton.is_model_ready(model) for model in triton_models(spec))

    def load(self, name: str) -> float:
        """Load ``name``'s Triton models (reloaded if loaded: a re-export's new files). The jobs are reloaded
        first so that they read the repository's catalog again: a model exported into it after the server started,
        or with new limits, is served as exported. Triton swaps a reloaded model in; running requests finish."""
        start = time.monotonic()
        for job in (TXT2IMG, IMG2IMG):
            self._control("load", job)
        for model in triton_models(self.spec(name)):
            self._control("load", model)
        return time.monotonic() - start

    def unload(self, name: str) -> float:
        start = time.monotonic()
        models = triton_models(self.spec(name))
        for model in models:
            self._control("unload", model)
        self._wait_unloaded(models)
        return time.monotonic() - start

    def _wait_unloaded(self, models: list[str], timeout: float = 120.0) -> None:
        """Triton answers an unload at once and unloads in the background (running requests finish first)."""
        deadline = time.monotonic() + timeout
        while True:
            states = {entry["name"]: entry.get("state", "") for entry in
                      self.triton.get_model_repository_index(headers=self.key.grpc_headers(), as_json=True).get("models", [])}
            busy = [model for model in models if states.get(model) in ("READY", "UNLOADING", "LOADING")]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise SdtrtError(f"{', '.join(busy)} still unloading after {timeout:.0f} s (a request still running?)")
            time.sleep(0.1)

    def _control(self, action: str, model: str) -> None:
        try:
            getattr(self.triton, f"{action}_model")(model, headers=self.key.grpc_headers())
        except InferenceServerException as exc:
            if exc.status() == "StatusCode.UNAVAILABLE" and "restricted" in (exc.message() or ""):
                raise UsageError(f"the server refused the control key from {self.key.source}: pass the key it was "
                                 "started with (--control-key-file FILE or $SDTRT_CONTROL_KEY)") from None
            raise SdtrtError(f"{action}ing {model} failed: {exc.message()} (the server's log says more; it keeps "
                             "serving its other models)") from None
