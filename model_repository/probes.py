"""The smallest request each Triton model of a repository answers: what `sdtrt serve`'s watchdog sends to tell a
model that works from one that hangs (sdtrt.model_repository.serving.health).

Every probe goes through the model's own Python code (Triton checks shapes first, and a probe Triton refused
would prove nothing about the stub): a network runs at its smallest shapes (the spec's dims, or the TensorRT
profile's minimum); the tokenizer tokenizes an empty prompt's pieces; ``progress`` answers an unknown id; a job model
gets ``steps=0``, which its own validation refuses at once (INVALID_ARG) without a denoising step. Inputs are
KServe v2 JSON, ready for ``POST /v2/models/<name>/infer``.
"""

from __future__ import annotations

from typing import Any

from sdtrt.contract.spec import (
    ENGINES,
    IMG2IMG,
    PROGRESS,
    PROGRESS_REQUEST_ID,
    TXT2IMG,
    WIRE_DTYPES,
    Catalog,
    ModelSpec,
    TensorSpec,
)
from sdtrt.model_repository.configs import NEGATIVE_PIECES, PIECE_TEXTS, PIECE_WEIGHTS, TOKENIZER, TOKENIZER_FIELDS

PROBE_ID = "sdtrt-watchdog-probe"
MAX_PROBE_ELEMENTS = 1 << 20  # a probe stays small: a network whose smallest call is larger is not probed


def _wire(dtype: str) -> str:
    return WIRE_DTYPES[dtype]


def _tensor(name: str, dtype: str, shape: list[int], fill: Any = 0) -> dict[str, Any]:
    count = 1
    for d in shape:
        count *= d
    return {"name": name, "datatype": _wire(dtype), "shape": shape, "data": [fill] * count}


def _smallest(spec: ModelSpec, component: str, tensor: TensorSpec) -> list[int]:
    engine = spec.extra.get(ENGINES, {}).get(component)
    if engine is not None:  # what the built engine takes, at its profile's minimum
        shape = list(engine["profile"][tensor.name][0])
    else:
        shape = spec.smallest_shape(tensor)
    return shape + [1] if len(tensor.shape) == 1 else shape  # per-row scalars travel as [rows, 1]


def network_probe(spec: ModelSpec, component: str) -> list[dict[str, Any]] | None:
    inputs = []
    for tensor in spec.component(component).inputs:
        shape = _smallest(spec, component, tensor)
        # token ids: BOS then EOS padding; other integers (Clip skip) 1; floats 0
        fill = 49407 if tensor.name == "input_ids" else 1 if tensor.dtype.startswith("int") else 0
        inputs.append(_tensor(tensor.name, tensor.dtype, shape, fill))
    if sum(len(t["data"]) for t in inputs) > MAX_PROBE_ELEMENTS:
        return None
    return inputs


def tokenizer_probe(spec: ModelSpec) -> list[dict[str, Any]]:
    """An empty prompt and negative prompt, one empty piece each, as a plan sends them."""
    return [_tensor(PIECE_TEXTS, "string", [2], ""), _tensor(PIECE_WEIGHTS, "float32", [2], 1.0),
            _tensor(NEGATIVE_PIECES, "int32", [1], 1),
            *(_tensor(name, spec.field(name).dtype, [1], spec.field(name).default) for name in TOKENIZER_FIELDS)]


def probes(catalog: Catalog) -> dict[str, list[dict[str, Any]]]:
    """Triton model name -> the inputs of its probe, for every model of the catalog and the shared ones."""
    found: dict[str, list[dict[str, Any]]] = {
        PROGRESS: [_tensor(PROGRESS_REQUEST_ID, "string", [1], PROBE_ID)],
        **{job: [_tensor("steps", "int32", [1], 0)] for job in (TXT2IMG, IMG2IMG)},
    }
    for spec in catalog.models.values():
        found[spec.triton_name(TOKENIZER)] = tokenizer_probe(spec)
        for name in spec.components:
            inputs = network_probe(spec, name)
            if inputs is not None:
                found[spec.triton_name(name)] = inputs
    return found

