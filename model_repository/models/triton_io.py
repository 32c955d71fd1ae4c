"""Small helpers shared by the Python-backend models (importable only inside Triton's Python stub).

Light on purpose: the progress, tokenizer and network models import this and not torch or diffusers, so their
stubs start in a fraction of a second and a few tens of MB; the job models' own helpers are in job_model.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.contract.errors import Cancelled, InvalidRequest, Unavailable
from sdtrt.contract.spec import ModelSpec, load_catalog
from sdtrt.model_repository.probes import PROBE_ID


def repo_root(args: dict[str, str]) -> Path:
    """The model repository's root: Triton hands each model its own folder, <repo>/<model>/."""
    return Path(args["model_repository"]).parent


def model_spec(args: dict[str, str]) -> ModelSpec:
    """The spec of the model a per-model Triton model (``<key>__<part>``) belongs to."""
    key, _, _ = args["model_name"].rpartition("__")
    return load_catalog(repo_root(args)).get(key)


def model_part(args: dict[str, str]) -> str:
    """``unet`` for ``<key>__unet``: which of its model's parts a per-model Triton model is."""
    return args["model_name"].rpartition("__")[2]


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def scalar(request, name: str) -> Any:
    """The single value of a [1]-shaped request field, decoded to str for BYTES; None when the field is absent."""
    array = optional_input(request, name)
    if array is None:
        return None
    if array.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.float32):  # the decimal the client wrote (0.8, not 0.800000011920929), as the infotext says it
        return float(str(value))
    return value.item()


MAX_ERROR_CHARS = 2000  # far below gRPC's 8 KiB limit on status details, whatever the message echoes


def error_response(message: str, code: str = "INTERNAL") -> "pb_utils.InferenceResponse":
    """A failed response; ``code`` names a pb_utils.TritonError status (INVALID_ARG, CANCELLED, ...). Messages are
    cut to MAX_ERROR_CHARS: every response must fit what the protocol can carry."""
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + f"... ({len(message)} characters)"
    error = pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class JsonLog:
    """One JSON object per log line, through Triton's own log (so --log-file and log levels apply)."""

    def __init__(self, model: str):
        self.model = model

    def _emit(self, fn, event: str, **fields: Any) -> None:
        fn(json.dumps({"model": self.model, "event": event, "ts": round(time.time(), 3), **fields}, default=str))

    def verbose(self, event: str, **fields: Any) -> None:
        self._emit(pb_utils.Logger.log_verbose, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(pb_utils.Logger.log_info, event, **fields)

    def warn(self, event: str, **fields: Any) -> None:
        self._emit(pb_utils.Logger.log_warn, event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(pb_utils.Logger.log_error, event, **fields)


class PerRequestModel:
    """One response per request, in order, whatever happens: ``run(request)`` builds it; a bad setting becomes
    INVALID_ARG naming the field, a cancelled request CANCELLED, anything else INTERNAL, and the model keeps
    serving. Subclasses set ``self.log`` in ``initialize`` and write ``run``."""

    log: JsonLog

    def run(self, request) -> "pb_utils.InferenceResponse":
        raise NotImplementedError

    def outcome(self, request, outcome: str) -> None:
        """Called once per request with how it ended (success, invalid_argument, cancelled, error)."""

    def respond(self, request) -> "pb_utils.InferenceResponse":
        """The one response of ``request``: what ``run`` builds, or the error it raised, named."""
        if request.request_id() == PROBE_ID:  # the watchdog's (model_repository/probes.py): answered, not counted
            try:
                return self.run(request)
            except Exception as exc:
                return error_response(str(exc), "INVALID_ARG" if isinstance(exc, InvalidRequest) else "INTERNAL")
        try:
            response = self.run(request)
            self.outcome(request, "success")
            return response
        except InvalidRequest as exc:
            self.log.info("invalid_request", field=exc.field)
            self.outcome(request, "invalid_argument")
            return error_response(str(exc), "INVALID_ARG")
        except Cancelled:
            self.log.info("cancelled", request_id=request.request_id())
            self.outcome(request, "cancelled")
            return error_response("request cancelled by the client", "CANCELLED")
        except Unavailable as exc:  # a stage hung or is being restarted: the client may retry
            self.log.warn("unavailable", request_id=request.request_id(), error=str(exc))
            self.outcome(request, "unavailable")
            return error_response(str(exc), "UNAVAILABLE")
        except Exception as exc:  # never let one request take the model down
            self.log.error("failed", error=repr(exc))
            self.outcome(request, "error")
            return error_response(f"{self.log.model}: {exc}")

    def execute(self, requests):
        return [self.respond(request) for request in requests]
