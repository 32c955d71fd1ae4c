"""sd-webui-controlnet's API, as A1111 with the extension answers it: the units of ``alwayson_scripts.controlnet``
in txt2img and img2img, and the extension's routes (/controlnet/version, model_list, module_list, detect,
settings, control_types).

A unit arrives as the extension's ControlNetUnit in JSON (a dict; the positional form of old clients is not
read): its picture (``image``: base64, or ``{"image": ..., "mask": ...}``; the old ``input_image``), its mask
(``mask`` / ``mask_image``), and its settings, which become sdtrt's unit settings (sdtrt.requests.controlnet) under
the same names; the resize and control modes by name or by their number, as the extension takes them. The
preprocessors run on the server, where the job plans the request; /controlnet/detect runs the same ones here, so
a client sees the map a unit will use.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, HTTPException

from sdtrt.client.apps.a1111_requests import open_image, refuse
from sdtrt.client.apps.a1111_responses import encode_png
from sdtrt.contract.spec import MAX_CONTROLNET_UNITS, Catalog
from sdtrt.requests.controlnet import CONTROL_MODES, RESIZE_MODES, ControlUnit
from sdtrt.requests.preprocessors import HIDDEN, PREPROCESSORS, preprocess

API_VERSION = 3  # the extension's external_code.get_api_version() (v1.1.455); its modes' numbers are read too
WHERE = "alwayson_scripts.controlnet.args"
# The old names of the modes (the extension's ResizeMode and ControlMode still read them)
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                  "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
SETTINGS = ("module", "model", "weight", "guidance_start", "guidance_end", "pixel_perfect", "processor_res",
            "threshold_a", "threshold_b", "hr_option")
# Fields of the extension's unit that change nothing here at their defaults; any other value is said to be ignored
PASSIVE = {"low_vram": False, "lowvram": False, "save_detected_map": True,
           "batch_images": "", "input_mode": "simple", "use_preview_as_input": False, "generated_image": None,
           "advanced_weighting": None, "effective_region_mask": None, "inpaint_crop_input_image": False,
           "animatediff_batch": False, "batch_modifiers": [], "batch_image_files": [], "batch_keyframe_idx": None,
           "ipadapter_input": None, "pulid_mode": "Fidelity", "union_control_type": "Unknown", "is_ui": False,
           "loopback": False, "guessmode": False, "output_dir": "", "preprocessor_preview": None}


def _mode(value: Any, choices: tuple[str, ...], field: str, aliases: dict[str, str] | None = None) -> str:
    """A mode by its name, its old name, or its number in the extension's order."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str):
        value = (aliases or {}).get(value, value)
        if value in choices:
            return value
    raise refuse(field, f"one of {', '.join(map(repr, choices))} (or its number 0-{len(choices) - 1}), got "
                        f"{str(value)[:40]!r}")


def _pictures(unit: dict[str, Any], field: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A unit's picture and mask (uint8 RGB and L), from any of the forms the extension reads."""
    image = unit.get("image", unit.get("input_image"))
    mask = unit.get("mask", unit.get("mask_image"))
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    if isinstance(image, list):
        raise refuse(f"{field}.image", "one picture (the extension's batch of pictures in a unit is not served)")
    picture = None if not image else np.asarray(open_image(str(image), f"{field}.image").convert("RGB"))
    held = None if not mask else np.asarray(open_image(str(mask), f"{field}.mask").convert("L"))
    return picture, held


def read_unit(unit: Any, index: int) -> dict[str, Any]:
    """One of the extension's units as sdtrt's unit settings with its pictures (``image``, ``mask``)."""
    field = f"{WHERE}.{index}"
    if not isinstance(unit, dict):
        raise refuse(field, "a ControlNet unit: an object of the extension's ControlNetUnit fields")
    out: dict[str, Any] = {name: unit[name] for name in SETTINGS if name in unit and unit[name] is not None}
    out["enabled"] = bool(unit.get("enabled", False))  # (the extension's default: a unit must say it is enabled)
    if unit.get("guidance") is not None and "guidance_end" not in out:  # (its old name)
        out["guidance_end"] = unit["guidance"]
    if "resize_mode" in unit:
        out["resize_mode"] = _mode(unit["resize_mode"], RESIZE_MODES, f"{field}.resize_mode", RESIZE_ALIASES)
    if "control_mode" in unit:
        out["control_mode"] = _mode(unit["control_mode"], CONTROL_MODES, f"{field}.control_mode")
    elif unit.get("guessmode"):  # the first API's guess mode: the ControlNet alone steers, since v1.1
        out["control_mode"] = CONTROL_MODES[2]
    out["image"], out["mask"] = _pictures(unit, field)
    return out


def controlnet_settings(args: list[Any]) -> dict[str, Any]:
    """The ``controlnet`` setting (the client library's units with their pictures) of the extension's args."""
    units = [read_unit(unit, i) for i, unit in enumerate(args)]
    enabled = [u for u in units if u["enabled"]]
    if len(enabled) > MAX_CONTROLNET_UNITS:
        raise refuse(WHERE, f"at most {MAX_CONTROLNET_UNITS} enabled units (A1111's control_net_unit_count), got "
                            f"{len(enabled)}")
    for unit in units:
        if unit.get("image") is None:
            unit.pop("image")
        if unit.get("mask") is None:
            unit.pop("mask")
    return {"controlnet": units} if units else {}


KNOWN = {*SETTINGS, "enabled", "guidance", "resize_mode", "control_mode", "image", "input_image", "mask", "mask_image"}


def ignored_unit_fields(args: list[Any]) -> list[str]:
    """The units' fields that change nothing here (the extension's fields sdtrt does not serve, not at their
    defaults), for the response's X-Sdtrt-Ignored-Fields."""
    return [f"{WHERE}.{i}.{name}" for i, unit in enumerate(args) if isinstance(unit, dict)
            for name, value in unit.items()
            if name not in KNOWN and (name not in PASSIVE or value != PASSIVE[name]) and value not in (None, "")]


def a1111_unit_field(field: str) -> str | None:
    """sdtrt's name of a unit's field (``controlnet_units[0].model``, ``controlnet_image_0``) as where the
    extension's request holds it (``alwayson_scripts.controlnet.args.0.model``); None for other fields."""
    match = re.fullmatch(r"controlnet_units(?:\[(\d+)\](?:\.(\w+))?)?|controlnet_(image|mask)_(\d+)", field)
    if match is None:
        return None
    if match.group(3):
        return f"{WHERE}.{match.group(4)}.{match.group(3)}"
    return ".".join(part for part in (WHERE, match.group(1), match.group(2)) if part)


def model_list(catalog: Catalog) -> list[str]:
    """The extension's model names: "None", then every ControlNet of the server's models as "stem [hash]"."""
    titles = dict.fromkeys(entry["title"] for spec in catalog.models.values() for entry in spec.controlnets.values())
    return ["None", *titles]


def module_detail() -> dict[str, Any]:
    """The extension's module_detail: each preprocessor's shown sliders (resolution, threshold_a, threshold_b)."""
    detail = {}
    for name, pre in PREPROCESSORS.items():
        sliders: list[dict[str, Any]] = []
        for label, slider in zip(("Resolution", *pre.labels), pre.sliders):
            if slider != HIDDEN and (label != "Resolution" or pre.run is not None):
                lo, hi, value = slider
                sliders.append({"name": label or "Threshold", "value": value, "min": lo, "max": hi,
                                "step": 8 if label == "Resolution" else (1 if isinstance(value, int) else 0.01)})
        detail[name] = {"model_free": True, "sliders": sliders}
    return detail


def detect(body: dict[str, Any]) -> dict[str, Any]:
    """/controlnet/detect: each picture's control map by the module (at its processor resolution and thresholds)."""
    module = str(body.get("controlnet_module", "none"))
    if module not in PREPROCESSORS:
        raise HTTPException(422, detail=f"Module not available: {module[:40]!r} (sdtrt's: {', '.join(PREPROCESSORS)})")
    images = body.get("controlnet_input_images") or []
    if not isinstance(images, list) or not images:
        raise HTTPException(422, detail="No image selected")
    if len(images) > 8:
        raise refuse("controlnet_input_images", f"at most 8 pictures a call, got {len(images)}")
    try:
        unit = ControlUnit(module=module, processor_res=int(body.get("controlnet_processor_res", -1)),
                           threshold_a=float(body.get("controlnet_threshold_a", -1)),
                           threshold_b=float(body.get("controlnet_threshold_b", -1)))
    except (TypeError, ValueError):
        raise refuse("controlnet_processor_res", "numbers: controlnet_processor_res (an integer), "
                                                 "controlnet_threshold_a and _b") from None
    out = []
    for i, data in enumerate(images):
        picture = np.asarray(open_image(str(data), f"controlnet_input_images.{i}").convert("RGB"))
        out.append(encode_png(preprocess(unit, picture, None, (picture.shape[1], picture.shape[0]))))
    return {"images": out, "info": "Success"}


def add_controlnet_routes(app: FastAPI, catalog) -> None:
    """The extension's routes; ``catalog()`` gives the server's models now."""
    app.add_api_route("/controlnet/version", lambda: {"version": API_VERSION}, methods=["GET"], tags=["controlnet"])
    app.add_api_route("/controlnet/settings", lambda: {"control_net_unit_count": MAX_CONTROLNET_UNITS},
                      methods=["GET"], tags=["controlnet"])

    @app.get("/controlnet/model_list", tags=["controlnet"])
    def models(update: bool = True) -> dict[str, Any]:
        return {"model_list": model_list(catalog())}

    @app.get("/controlnet/module_list", tags=["controlnet"])
    def modules(alias_names: bool = False) -> dict[str, Any]:
        return {"module_list": list(PREPROCESSORS), "module_detail": module_detail()}

    @app.post("/controlnet/detect", tags=["controlnet"])
    def detect_route(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return detect(body)
