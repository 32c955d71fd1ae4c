"""The txt2img request: its fields (names, wire dtypes, defaults, limits) and their validation.

The table is built here once per model at export time and stored in the spec; servers, clients and the
CLI validate against the spec's copy, so every error names the field and its allowed range the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from sdtrt.errors import InvalidRequest
from sdtrt.samplers import DEFAULT_SAMPLER, DEFAULT_SCHEDULE, SCHEDULE_TYPES, resolve, sampler_names
from sdtrt.seeds import MAX_SEED, RANDOM_SEED, resolve_seed
from sdtrt.spec import FieldSpec, ModelSpec

MAX_STEPS = 150  # AUTOMATIC1111's slider maximum
MAX_GUIDANCE = 30.0


@dataclass(frozen=True)
class Txt2ImgRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = RANDOM_SEED
    steps: int = 20
    guidance_scale: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    schedule_type: str = DEFAULT_SCHEDULE
    width: int | None = None  # None: the model's native size
    height: int | None = None
    batch_size: int = 1
    clip_skip: int = 1
    subseed: int = RANDOM_SEED
    subseed_strength: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def request_fields(
    native_size: int, min_size: int, max_size: int, size_multiple: int, max_batch: int, clip_layers: int = 12
) -> dict[str, FieldSpec]:
    """The request table for one model; export stores it in the spec."""
    fields = [
        FieldSpec("prompt", "string", "", "what to draw"),
        FieldSpec("negative_prompt", "string", "", "what to steer away from"),
        FieldSpec("seed", "int64", RANDOM_SEED, "seed of image 0; image i uses seed+i; -1 picks one at random",
                  minimum=RANDOM_SEED, maximum=MAX_SEED),
        FieldSpec("steps", "int32", 20, "sampling steps", minimum=1, maximum=MAX_STEPS),
        FieldSpec("guidance_scale", "float32", 7.0, "classifier-free guidance (CFG) scale; <= 1 turns guidance off",
                  minimum=0.0, maximum=MAX_GUIDANCE),
        FieldSpec("sampler", "string", DEFAULT_SAMPLER, "AUTOMATIC1111 sampler name", choices=sampler_names()),
        FieldSpec("schedule_type", "string", DEFAULT_SCHEDULE,
                  "noise schedule (A1111's 'Schedule type'); Automatic = the sampler's own", choices=tuple(SCHEDULE_TYPES)),
        FieldSpec("width", "int32", native_size, "image width in pixels", minimum=min_size, maximum=max_size,
                  multiple_of=size_multiple),
        FieldSpec("height", "int32", native_size, "image height in pixels", minimum=min_size, maximum=max_size,
                  multiple_of=size_multiple),
        FieldSpec("batch_size", "int32", 1, "images generated together from one prompt", minimum=1, maximum=max_batch),
        FieldSpec("clip_skip", "int32", 1, "use the output of CLIP's n-th layer from the end (A1111's Clip skip)",
                  minimum=1, maximum=min(12, clip_layers)),
        FieldSpec("subseed", "int64", RANDOM_SEED, "variation seed of image 0 (image i uses subseed+i); -1 picks one",
                  minimum=RANDOM_SEED, maximum=MAX_SEED),
        FieldSpec("subseed_strength", "float32", 0.0, "how far each image's noise moves towards its variation seed's",
                  minimum=0.0, maximum=1.0),
    ]
    return {f.name: f for f in fields}


def check_value(field: FieldSpec, value: Any) -> Any:
    """Coerce one value to the field's type and check it against the field's limits."""
    if field.dtype == "string":
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise InvalidRequest(field.name, value, field.allowed())
        if field.choices is not None and value not in field.choices:
            raise InvalidRequest(field.name, value, field.allowed())
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "item"):
        raise InvalidRequest(field.name, value, field.allowed())
    value = value.item() if hasattr(value, "item") else value
    if field.dtype.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise InvalidRequest(field.name, value, field.allowed())
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise InvalidRequest(field.name, value, field.allowed())
    if field.minimum is not None and value < field.minimum or field.maximum is not None and value > field.maximum:
        raise InvalidRequest(field.name, value, field.allowed())
    if field.multiple_of and value % field.multiple_of:
        raise InvalidRequest(field.name, value, field.allowed())
    return value


def validate(request: Txt2ImgRequest, spec: ModelSpec) -> Txt2ImgRequest:
    """A copy of the request with defaults filled in from the spec and every field checked."""
    values = {}
    for name, value in request.as_dict().items():
        field = spec.field(name)
        values[name] = check_value(field, field.default if value is None else value)
    resolve(values["sampler"], values["schedule_type"])  # not every sampler follows every schedule
    return Txt2ImgRequest(**values)


def resolve_seeds(request: Txt2ImgRequest) -> Txt2ImgRequest:
    """-1 seeds replaced by random ones (the variation seed only when it is used)."""
    subseed = resolve_seed(request.subseed) if request.subseed_strength > 0 else request.subseed
    return replace(request, seed=resolve_seed(request.seed), subseed=subseed)
