"""Small helpers shared by the Python-backend models (importable only inside Triton's Python stub)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.spec import ModelSpec, load_spec


def repo_root(args: dict[str, str]) -> Path:
    """The model repository's root: Triton hands each model its own folder, <repo>/<model>/."""
    return Path(args["model_repository"]).parent


def model_spec(args: dict[str, str]) -> ModelSpec:
    return load_spec(repo_root(args))


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
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value.item()


def error_response(message: str, code: str = "INTERNAL") -> "pb_utils.InferenceResponse":
    """A failed response; ``code`` names a pb_utils.TritonError status (INVALID_ARG, CANCELLED, ...)."""
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
