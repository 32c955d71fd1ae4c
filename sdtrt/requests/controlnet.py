"""A request's ControlNet units, as A1111's sd-webui-controlnet takes them: which ControlNet, its picture, the
preprocessor that makes the control map of it, how the map fits the generation's size, and how strongly and when
the unit steers the U-Net.

A request carries its units as one JSON list in ``controlnet_units`` (the extension's field names) and each
enabled unit's picture as the job input ``controlnet_image_<i>`` (its mask as ``controlnet_mask_<i>``). The plan
reads them once (``plan_units``): the preprocessor runs there, the map is kept, and each denoising pass fits it to
its own size (``control_hint``; the hires fix's second pass at the upscaled size, as the extension does). The loop's
side is ``sdtrt.pipeline.conditioning.ControlledUNet``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.pictures import MAX_PICTURE_PIXELS
from sdtrt.contract.spec import MAX_CONTROLNET_UNITS, ModelSpec
from sdtrt.requests.preprocessors import PREPROCESSORS, bounded, preprocess, resize_map

FIELD = "controlnet_units"
MAX_UNITS_JSON = 16384  # characters of the field: every unit's settings, no pictures
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
SOFT_INJECTION = 0.825  # "My prompt is more important": residual i scaled by this ** (12 - i) (SDXL's 10: the first 10)
HR_OPTIONS = ("Both", "Low res only", "High res only")
MAX_UNIT_SLOTS = 10  # units one request may list (the extension's largest control_net_unit_count); 3 enabled


@dataclass(frozen=True)
class ControlUnit:
    """One unit, as the extension's API names its fields (``image`` and ``mask`` travel as the job's pictures)."""

    model: str = "None"
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    pixel_perfect: bool = False
    processor_res: int = -1  # -1: the preprocessor's default (512)
    threshold_a: float = -1.0  # -1: the preprocessor's default
    threshold_b: float = -1.0
    enabled: bool = True
    hr_option: str = "Both"  # with the hires fix: the passes it steers (Both, Low res only, High res only)


_LIMITS = {"weight": (0.0, 2.0), "guidance_start": (0.0, 1.0), "guidance_end": (0.0, 1.0)}


def _where(index: int, name: str) -> str:
    return f"{FIELD}[{index}].{name}"


def _checked(index: int, data: Any) -> ControlUnit:
    if not isinstance(data, dict):
        raise InvalidRequest(FIELD + f"[{index}]", str(data)[:40], "an object of a unit's settings")
    known = {f.name: f for f in fields(ControlUnit)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidRequest(_where(index, unknown[0]), data[unknown[0]], "one of a unit's settings: " +
                             ", ".join(known))
    values = {}
    for name, value in data.items():
        kind = type(getattr(ControlUnit(), name))
        if kind is bool and not isinstance(value, bool):
            raise InvalidRequest(_where(index, name), value, "true or false")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidRequest(_where(index, name), value, "a number")
        if kind is str and not isinstance(value, str):
            raise InvalidRequest(_where(index, name), value, "text")
        values[name] = kind(value)
    unit = ControlUnit(**values)
    for name, (lo, hi) in _LIMITS.items():
        if not lo <= getattr(unit, name) <= hi:
            raise InvalidRequest(_where(index, name), getattr(unit, name), f"a number from {lo:g} to {hi:g}")
    if unit.guidance_start > unit.guidance_end:
        raise InvalidRequest(_where(index, "guidance_end"), unit.guidance_end,
                             f"a number from guidance_start ({unit.guidance_start:g}) to 1")
    for name, choices in (("control_mode", CONTROL_MODES), ("resize_mode", RESIZE_MODES), ("hr_option", HR_OPTIONS)):
        if getattr(unit, name) not in choices:
            raise InvalidRequest(_where(index, name), getattr(unit, name), "one of: " + ", ".join(map(repr, choices)))
    if unit.module not in PREPROCESSORS:
        raise InvalidRequest(_where(index, "module"), unit.module, "one of the preprocessors that need no model "
                             f"file ({', '.join(PREPROCESSORS)}); a model's (openpose, depth, ...) is not served: "
                             "send its map with module none")
    if unit.enabled and unit.model in ("None", ""):
        raise InvalidRequest(_where(index, "model"), unit.model, "a ControlNet for an enabled unit (the extension's "
                             "\"You have not selected any ControlNet Model\")")
    return bounded(unit)  # (the extension puts out-of-range sliders back to their defaults)


def read_units(text: str) -> tuple[ControlUnit, ...]:
    """The units of a request's ``controlnet_units`` ("" or "[]": none), each checked, naming the unit and field."""
    if not text.strip():
        return ()
    if len(text) > MAX_UNITS_JSON:
        raise InvalidRequest(FIELD, f"<{len(text)} characters>", f"at most {MAX_UNITS_JSON} characters of settings")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(FIELD, text[:40], f"a JSON list of units ({exc.msg} at {exc.pos})") from None
    if not isinstance(data, list):
        raise InvalidRequest(FIELD, text[:40], "a JSON list of units")
    if len(data) > MAX_UNIT_SLOTS:
        raise InvalidRequest(FIELD, f"<{len(data)} units>", f"at most {MAX_UNIT_SLOTS} units")
    units = tuple(_checked(i, unit) for i, unit in enumerate(data))
    if sum(u.enabled for u in units) > MAX_CONTROLNET_UNITS:
        raise InvalidRequest(FIELD, f"<{sum(u.enabled for u in units)} enabled units>", f"at most "
                             f"{MAX_CONTROLNET_UNITS} enabled units (A1111's control_net_unit_count)")
    return units


def check_units(text: str, spec: ModelSpec) -> tuple[ControlUnit, ...]:
    """The units read and their ControlNets looked up (what a client checks before sending: no pictures)."""
    units = read_units(text)
    for index, unit in enumerate(units):
        if unit.enabled:
            try:
                spec.controlnet(unit.model)
            except InvalidRequest as exc:
                raise InvalidRequest(_where(index, "model"), unit.model, exc.allowed) from None
    return units


def units_json(units: list[ControlUnit] | tuple[ControlUnit, ...]) -> str:
    """The field's text for ``units`` (what a client sends)."""
    defaults = asdict(ControlUnit())
    return json.dumps([{k: v for k, v in asdict(u).items() if v != defaults[k] or k == "model"} for u in units])


@dataclass(frozen=True)
class PlannedUnit:
    """An enabled unit, read: its ControlNet's network, its control map (the preprocessor's output, uint8 [H, W, C])
    and the settings the loop applies."""

    unit: ControlUnit
    title: str  # A1111's "name [hash]"
    network: str
    detected: np.ndarray

    def scales(self, residuals: int) -> tuple[float, ...]:
        """Each residual's scale for the cond rows: the weight, and with a control mode other than Balanced the
        extension's soft injection: its 13 scales for SD 1.x's residuals (the middle block's at full weight, each
        one before 0.825 times the next), the first of them for a U-Net with fewer (SDXL's 10)."""
        if self.unit.control_mode == CONTROL_MODES[0]:
            return (self.unit.weight,) * residuals
        return tuple(self.unit.weight * SOFT_INJECTION ** float(12 - i) for i in range(residuals))

    @property
    def uncond_too(self) -> bool:
        """Whether the uncond rows get the residuals too ("ControlNet is more important": only the conds)."""
        return self.unit.control_mode != CONTROL_MODES[2]

    def steers(self, hires: bool | None) -> bool:
        """Whether the unit steers a pass by its hr_option (``hires``: None without the hires fix, else whether the
        pass is its second)."""
        if hires is None:
            return True
        return self.unit.hr_option == "Both" or (self.unit.hr_option == "High res only") == hires

    def active(self, step: int, steps: int) -> bool:
        """The extension's guidance window: the unit steers the calls of the 0-based ``step`` of ``steps`` while
        A1111's sampling step over its sampling steps lies within [guidance_start, guidance_end]. A1111's sampling
        step is the last finished step's number (its sampler's callback sets it after each step; 0 before the
        first), so step i reads (i - 1) / steps."""
        done = max(step - 1, 0) / max(steps, 1)
        return self.unit.guidance_start <= done <= self.unit.guidance_end


def plan_units(text: str, spec: ModelSpec, pictures: list[np.ndarray | None], masks: list[np.ndarray | None],
               size: tuple[int, int]) -> tuple[PlannedUnit, ...]:
    """The request's enabled units, each with its ControlNet (refused naming the unit when the model has no such
    ControlNet) and its control map made from its picture (``pictures[i]``: the i-th unit's) at the generation's
    ``size`` (width, height)."""
    planned = []
    for index, unit in enumerate(read_units(text)):
        if not unit.enabled:
            continue
        try:
            entry = spec.controlnet(unit.model)
        except InvalidRequest as exc:
            raise InvalidRequest(_where(index, "model"), unit.model, exc.allowed) from None
        picture = pictures[index] if index < len(pictures) else None
        if picture is None:
            raise InvalidRequest(f"controlnet_image_{index}", None, f"a picture for unit {index} (its control image)")
        mask = masks[index] if index < len(masks) else None
        detected = preprocess(unit, _rgb(picture, index), mask, size)
        planned.append(PlannedUnit(unit, entry["title"], entry["network"], detected))
    return tuple(planned)


MAX_ASPECT = 8  # a control picture's long side over its short side: its map at the processor resolution is bounded


def _rgb(picture: np.ndarray, index: int) -> np.ndarray:
    picture = np.asarray(picture)
    shown = f"<{picture.dtype} array of shape {list(picture.shape)}>"
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] not in (3, 4) or min(picture.shape[:2]) < 1:
        raise InvalidRequest(f"controlnet_image_{index}", shown, "an RGB uint8 picture [H, W, 3]")
    h, w = picture.shape[:2]
    if h * w > MAX_PICTURE_PIXELS or max(h, w) > MAX_ASPECT * min(h, w):
        raise InvalidRequest(f"controlnet_image_{index}", shown, f"a picture of at most {MAX_PICTURE_PIXELS:,} pixels "
                             f"whose long side is at most {MAX_ASPECT}x its short side")
    return picture[..., :3]


def control_hint(unit: PlannedUnit, width: int, height: int) -> np.ndarray:
    """The unit's control map at a pass's size, as the ControlNet takes it: [C, H, W] float32 in [0, 1], fitted by
    the unit's resize mode."""
    fitted = resize_map(unit.detected, width, height, unit.unit.resize_mode)
    return np.ascontiguousarray(fitted.transpose(2, 0, 1), dtype=np.float32) / 255.0


def infotext_entries(units: tuple[PlannedUnit, ...]) -> dict[str, str]:
    """The extension's infotext: one "ControlNet <i>" entry per unit, its settings as one (quoted) value."""
    out = {}
    for i, planned in enumerate(units):
        u = planned.unit
        # (Python's own str() of each value, as the extension writes them: 1.0, 512, 0.5, False)
        parts = [("Module", u.module), ("Model", planned.title), ("Weight", u.weight), ("Resize Mode", u.resize_mode),
                 ("Processor Res", u.processor_res), ("Threshold A", u.threshold_a), ("Threshold B", u.threshold_b),
                 ("Guidance Start", u.guidance_start), ("Guidance End", u.guidance_end),
                 ("Pixel Perfect", u.pixel_perfect), ("Control Mode", u.control_mode)]
        out[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in parts)  # (quoted by build_infotext)
    return out



