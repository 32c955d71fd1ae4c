"""A1111's always-on scripts as its API takes them: ``alwayson_scripts``, ``{title: {"args": [...]}}``.

A1111 runs every always-on script on every request; naming one in ``alwayson_scripts`` only sets its arguments
(copied by position, as many as both the request and the script have). Its API finds the script by title without
case, refuses a name it lacks and a selectable script named there, each with a 422. What each built-in one does
through the API:

- Refiner, Seed, Sampler: the request's own fields in the UI's controls. A1111's API skips their setup (they are
  for the UI only), so their arguments change nothing: the request's fields decide (the arguments are listed as
  ignored).
- Comments: no arguments; it strips ``#`` comments from the prompts (option ``enable_prompt_comments``), which
  sdtrt does on every request (a1111_requests.translate), as A1111 does.
- Extra options: the settings the user put in the UI (none by default): no arguments through the API.
- Hypertile: no arguments; its options decide (hypertile_enable_unet, ...: request fields of the same names, served by
  models exported with --hypertile).
- Soft Inpainting (img2img): its arguments are sdtrt's ``soft_inpainting`` fields (sdtrt.pipeline.soft_inpainting).
- ControlNet (sd-webui-controlnet, an extension A1111 users add): its units (``args``: one ControlNetUnit object
  each) are the request's ControlNet units (client/apps/a1111_controlnet.py), for the models exported with
  --controlnets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sdtrt.client.apps.a1111_controlnet import controlnet_settings, ignored_unit_fields
from sdtrt.client.apps.a1111_requests import Img2ImgBody, _Request, refuse
from sdtrt.client.apps.a1111_scripts import SCRIPTS, Arg, _flag, _number
from sdtrt.contract.samplers import SAMPLERS, SCHEDULE_TYPES
from sdtrt.contract.spec import IMG2IMG, TXT2IMG, Catalog
from sdtrt.requests.fields import BY_NAME

# What A1111 users send that comes with another of sdtrt's open issues: said in the refusal.
COMING: dict[str, str] = {}


@dataclass(frozen=True)
class AlwaysOn:
    """One of A1111's always-on scripts: its UI controls (what /sdapi/v1/script-info lists; A1111 lists only
    scripts whose UI has controls) and what its arguments set (``read``: arguments -> sdtrt settings; None:
    they change nothing through the API)."""

    title: str
    tabs: tuple[str, ...]
    args: tuple[Arg, ...] = ()
    defaults: tuple[Any, ...] = ()
    read: Callable[[list[Any]], dict[str, Any]] | None = None
    has_ui: bool = True  # named by /sdapi/v1/scripts and described by script-info
    variadic: bool = False  # its args are its units, as many as sent (ControlNet's), not positions in its UI


# Soft Inpainting's settings: sdtrt's soft_inpainting_* fields (their labels, ranges and defaults are A1111's UI
# sliders'), in its UI's order, with the sliders' steps
SOFT_INPAINTING_FIELDS = tuple(f for f in BY_NAME if f.startswith("soft_inpainting_"))
_STEPS = (0.1, 0.05, 0.5, 0.05, 0.25, 0.25)
SOFT_INPAINTING_ARGS = (Arg(BY_NAME["soft_inpainting"].label), *(
    Arg(BY_NAME[name].label, BY_NAME[name].minimum, BY_NAME[name].maximum, step)
    for name, step in zip(SOFT_INPAINTING_FIELDS, _STEPS)))
SOFT_INPAINTING_DEFAULTS = (False, *(BY_NAME[name].default for name in SOFT_INPAINTING_FIELDS))
_SOFT_WHERE = "alwayson_scripts.soft inpainting.args"


def soft_inpainting(args: list[Any]) -> dict[str, Any]:
    """A1111's Soft Inpainting arguments (enabled, then its six settings in its UI's order) as sdtrt's fields."""
    if not _flag(args, 0, SOFT_INPAINTING_ARGS[0].label, _SOFT_WHERE):
        return {}
    return {"soft_inpainting": True, **{
        name: _number(args, i + 1, arg.label, arg.minimum, arg.maximum, float, _SOFT_WHERE)
        for i, (name, arg) in enumerate(zip(SOFT_INPAINTING_FIELDS, SOFT_INPAINTING_ARGS[1:]))}}


def _sampler_args() -> tuple[Arg, ...]:
    return (Arg("Sampling steps", 1, 150, 1), Arg("Sampling method", choices=tuple(SAMPLERS)),
            Arg("Schedule type", choices=tuple(SCHEDULE_TYPES)))


ALWAYSON = {s.title.lower(): s for s in (
    AlwaysOn("Extra options", (TXT2IMG, IMG2IMG)),
    AlwaysOn("Hypertile", (TXT2IMG, IMG2IMG), has_ui=False),
    AlwaysOn("Soft Inpainting", (IMG2IMG,), SOFT_INPAINTING_ARGS, SOFT_INPAINTING_DEFAULTS, soft_inpainting),
    AlwaysOn("Comments", (TXT2IMG, IMG2IMG), has_ui=False),
    AlwaysOn("ControlNet", (TXT2IMG, IMG2IMG), read=controlnet_settings, has_ui=False, variadic=True),
    AlwaysOn("Refiner", (TXT2IMG, IMG2IMG), (Arg("Refiner"), Arg("Checkpoint"), Arg("Switch at", 0.01, 1, 0.01)),
             (False, "", 0.8)),
    AlwaysOn("Sampler", (TXT2IMG, IMG2IMG), _sampler_args(), (20, "DPM++ 2M", SCHEDULE_TYPES[0])),
    AlwaysOn("Seed", (TXT2IMG, IMG2IMG),
             (Arg("Seed"), Arg("Extra"), Arg("Variation seed"), Arg("Variation strength", 0, 1, 0.01),
              Arg("Resize seed from width", 0, 2048, 8), Arg("Resize seed from height", 0, 2048, 8)),
             (-1, False, -1, 0.0, 0, 0)),
)}


def _tab(body: _Request) -> str:
    return IMG2IMG if isinstance(body, Img2ImgBody) else TXT2IMG


def _named(body: _Request) -> list[tuple[AlwaysOn, list[Any]]]:
    """The always-on scripts a request names, each with its arguments as A1111 copies them (defaults after);
    a 422 as A1111's for a name it would not find, a selectable script, or a value that is not
    ``{"args": [...]}``."""
    tab, found = _tab(body), []
    for name, value in body.alwayson_scripts.items():
        key = str(name).lower()
        where = f"alwayson_scripts.{str(name)[:80]}"
        if key in COMING:
            raise refuse("alwayson_scripts", f"{str(name)[:80]!r}: not in sdtrt yet ({COMING[key]})")
        if key in SCRIPTS and tab in SCRIPTS[key].tabs:
            raise refuse("alwayson_scripts", f"{str(name)[:80]!r} is a selectable script, not an always-on one: "
                                             "name it in script_name (A1111 refuses it here too)")
        script = ALWAYSON.get(key)
        if script is None or tab not in script.tabs:
            titles = ", ".join(s.title for s in ALWAYSON.values() if tab in s.tabs)
            raise refuse("alwayson_scripts", f"always on script {str(name)[:80]!r} not found; {tab}'s: {titles}")
        args = value.get("args", []) if isinstance(value, dict) else None
        if not isinstance(args, list):
            raise refuse(where, 'an object {"args": [...]} (the script\'s arguments in its UI\'s order)')
        if script.variadic:
            found.append((script, args))
            continue
        given = args[:len(script.defaults)]
        found.append((script, given + list(script.defaults[len(given):])))
    return found


def alwayson_settings(body: _Request) -> dict[str, Any]:
    """What the request's always-on scripts' arguments set, in sdtrt's settings (checked, named when not)."""
    settings: dict[str, Any] = {}
    for script, args in _named(body):
        if script.read is not None:
            settings.update(script.read(args))
    return settings


def ignored_alwayson(body: _Request) -> list[str]:
    """The always-on scripts named with arguments that change nothing through A1111's API (Refiner, Seed,
    Sampler: the request's fields decide)."""
    ignored = [f"alwayson_scripts.{name}" for name, value in body.alwayson_scripts.items()
               if (s := ALWAYSON.get(str(name).lower())) is not None and s.read is None and s.args
               and isinstance(value, dict) and value.get("args")]
    for name, value in body.alwayson_scripts.items():
        if str(name).lower() == "controlnet" and isinstance(value, dict) and isinstance(value.get("args"), list):
            ignored += ignored_unit_fields(value["args"])
    return ignored


def alwayson_titles(tab: str) -> list[str]:
    """The tab's always-on scripts as A1111's /sdapi/v1/scripts names them: lower case, those with UI controls;
    Hypertile by its class' own name (it has no controls, and A1111 lists it so)."""
    return [s.title.lower() if s.has_ui else s.title for s in ALWAYSON.values()
            if tab in s.tabs and (s.has_ui or s.title == "Hypertile")]


def alwayson_info(catalog: Catalog) -> list[dict[str, Any]]:
    """/sdapi/v1/script-info's always-on entries (txt2img's, then img2img's); the Refiner's checkpoints are the
    server's models."""
    info = []
    for tab in (TXT2IMG, IMG2IMG):
        for script in ALWAYSON.values():
            if tab not in script.tabs or not script.has_ui:
                continue
            args = []
            for arg, value in zip(script.args, script.defaults):
                choices = [m.title for m in catalog.models.values()] if arg.label == "Checkpoint" else arg.choices
                args.append({"label": arg.label, "value": value, "minimum": arg.minimum, "maximum": arg.maximum,
                             "step": arg.step, "choices": list(choices) if choices is not None else None})
            info.append({"name": script.title.lower(), "is_alwayson": True, "is_img2img": tab == IMG2IMG,
                         "args": args})
    return info
