"""A1111's built-in scripts as its API runs them (``script_name``, ``script_args``): Prompt matrix and X/Y/Z plot
(txt2img and img2img), Loopback and SD upscale (img2img).

A script here is what it is in A1111: a plan of ordinary generations made from the request (a prompt per
combination, a cell per axis value, a loop per pass, a tile per part of the upscaled picture), then pictures
composed from theirs (sdtrt.requests.grids). Each generation is the gateway's own (``Generate``: an A1111 request
in, the server's answer out), so every field is checked and translated as for a plain request. ``script_args`` are
positional, as A1111's UI returns them; missing ones take A1111's defaults. What a script asks for is counted and
bounded before its first generation starts.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from sdtrt.client.apps.a1111_requests import (
    Img2ImgBody,
    _Request,
    refuse,
)
from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.seeds import MAX_SEED
from sdtrt.contract.spec import CLIP_INTERROGATOR, IMG2IMG, TXT2IMG
from sdtrt.requests.generation import Generation
from sdtrt.requests.grids import Label, annotate_grid, combine_tiles, image_grid, split_tiles
from sdtrt.requests.infotext import build_infotext, parse_infotext
from sdtrt.postprocessing.interrogate import DEEPBOORU
from sdtrt.postprocessing.upscale import (EXTRAS_UPSCALERS, MAX_SIDE, NO_UPSCALER, ExtrasUpscale, ModelUpscalers,
                                    check_upscale, upscale_by)

# The generations one script request may start (each at most the model's batch size): a grid of 10 x 10 cells.
MAX_SCRIPT_GENERATIONS = 100
MAX_AXIS_CHARS = 4096  # an axis' values as text

# A generation of the script: an A1111 request (the script's variant of the one sent) and, for img2img, the
# pictures it starts from -> the server's answer (the gateway's errors and statuses included).
class Generate(Protocol):
    """What a script may ask of the gateway: a generation (a plain request of the same user, with img2img's
    pictures), and the server's upscaler models (SD upscale's upscaler)."""

    def __call__(self, variant: _Request, pictures: "list[Image.Image] | None") -> Generation: ...

    def upscalers(self) -> ModelUpscalers: ...

    def interrogate(self, picture: Image.Image, model: str) -> str: ...


@dataclass
class ScriptRun:
    """A script's answer in A1111's order: grids first (``index_of_first_image`` says where the pictures start)."""

    images: list[np.ndarray]
    seeds: list[int]
    infotexts: list[str]
    index_of_first_image: int = 0


def with_params(infotext: str, params: dict[str, Any]) -> str:
    """An infotext with ``params`` added at the end of its settings line (A1111's extra_generation_params)."""
    prompt, negative, existing = parse_infotext(infotext)
    return build_infotext(prompt, negative, {**existing, **params})


def fixed_seed(body: _Request) -> int:
    """A1111's fix_seed: the request's seed, a random one for -1, so every generation of a script can name it."""
    return random.randint(0, MAX_SEED) if body.seed in (None, -1) else int(body.seed)


def variant(body: _Request, **changes: Any) -> _Request:
    """The request with ``changes``, and no script (each generation is a plain one)."""
    return body.model_copy(update={"script_name": None, "script_args": [], **changes})


def _choice(args: Sequence[Any], i: int, name: str, choices: Sequence[str]) -> str:
    if args[i] not in choices:
        raise refuse(f"script_args[{i}]", f"{name}: one of {', '.join(map(repr, choices))} (got {str(args[i])[:80]!r})")
    return args[i]


def _number(args: Sequence[Any], i: int, name: str, low: float, high: float, kind: type = int,
            where: str = "script_args") -> Any:
    """A script's numeric argument, checked (``where``: the request key its arguments sit under)."""
    value = args[i]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or (kind is int and value != int(value)):
        raise refuse(f"{where}[{i}]", f"{name}: {'an integer' if kind is int else 'a number'} from {low:g} to "
                                      f"{high:g} (got {str(value)[:80]!r})")
    return kind(value)


def _flag(args: Sequence[Any], i: int, name: str, where: str = "script_args") -> bool:
    if not isinstance(args[i], bool):
        raise refuse(f"{where}[{i}]", f"{name}: true or false (got {str(args[i])[:80]!r})")
    return args[i]


def _bound(count: int, what: str) -> None:
    if count > MAX_SCRIPT_GENERATIONS:
        raise refuse("script_args", f"{what} makes {count} generations; at most {MAX_SCRIPT_GENERATIONS} in one "
                                    "request: split it over several")


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# --- Prompt matrix -------------------------------------------------------------------------------------------
def prompt_matrix(body: _Request, args: list[Any], generate: Generate, init: list[Image.Image] | None) -> ScriptRun:
    """Every combination of the prompt's ``|``-separated parts after the first, each drawn with the same seed (or
    seed + i with "Random seeds"), then a grid with the parts as labels, struck out where left out."""
    at_start, different = _flag(args, 0, "put_at_start"), _flag(args, 1, "different_seeds")
    prompt_type = _choice(args, 2, "prompt_type", ("positive", "negative"))
    delimiter = {"comma": ", ", "space": " "}[_choice(args, 3, "variations_delimiter", ("comma", "space"))]
    margin = _number(args, 4, "margin_size", 0, 500)
    field = "prompt" if prompt_type == "positive" else "negative_prompt"
    parts = getattr(body, field).split("|")
    _bound(2 ** (len(parts) - 1), f"a prompt matrix of {len(parts) - 1} parts")
    seed = fixed_seed(body)
    prompts = []
    for combination in range(2 ** (len(parts) - 1)):
        chosen = [text.strip().strip(",") for n, text in enumerate(parts[1:]) if combination & (1 << n)]
        prompts.append(delimiter.join(chosen + [parts[0]] if at_start else [parts[0]] + chosen))
    results = []
    for i, prompt in enumerate(prompts):
        one = generate(variant(body, **{field: prompt}, seed=seed + (i if different else 0), batch_size=1,
                               n_iter=1), init)
        if not len(one.images):
            break  # interrupted
        results.append(one)
    images = [Image.fromarray(r.images[0]) for r in results]
    run = ScriptRun([r.images[0] for r in results], [r.seeds[0] for r in results], [r.infotexts[0] for r in results])
    if len(images) < len(prompts) or not images:
        return run
    rows = 1 << ((len(parts) - 1) // 2)
    labels = parts[1:]
    split = math.ceil(len(labels) / 2)

    def blocks(names: list[str]) -> list[list[Label]]:
        return [[Label(name, bool(pos & (1 << i))) for i, name in enumerate(names)] for pos in range(1 << len(names))]

    grid = annotate_grid(image_grid(images, rows), images[0].width, images[0].height, blocks(labels[:split]),
                         blocks(labels[split:]), margin)
    return ScriptRun([_array(grid), *run.images], [run.seeds[0], *run.seeds], [run.infotexts[0], *run.infotexts], 1)


# --- X/Y/Z plot ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """One of A1111's X/Y/Z axis types: the A1111 request field (or option) its values set, and their type."""

    label: str
    kind: type | None = None  # int, float, str, bool; None: an axis sdtrt does not serve
    field: str | None = None  # the request field it sets; an ``override_settings`` key after "options."
    tabs: tuple[str, ...] = (TXT2IMG, IMG2IMG)
    labelled: bool = True  # "Steps: 20" over the column (False: the value alone)
    why: str = ""


ABSENT = "sdtrt does not have it"
# A1111 1.10's axis types in its order (a request names one by its index among those of its tab, or by label).
AXES = (
    Axis("Nothing", str, labelled=False), Axis("Seed", int, "seed"), Axis("Var. seed", int, "subseed"),
    Axis("Var. strength", float, "subseed_strength"), Axis("Steps", int, "steps"),
    Axis("Hires steps", int, "hr_second_pass_steps", (TXT2IMG,)), Axis("CFG Scale", float, "cfg_scale"),
    Axis("Image CFG Scale", float, "image_cfg_scale", (IMG2IMG,)),
    Axis("Prompt S/R", str, "prompt", labelled=False), Axis("Prompt order", tuple, "prompt order", labelled=False),
    Axis("Sampler", str, "sampler_name", (TXT2IMG,), labelled=False),
    Axis("Hires sampler", str, "hr_sampler_name", (TXT2IMG,), labelled=False),
    Axis("Sampler", str, "sampler_name", (IMG2IMG,), labelled=False),
    Axis("Checkpoint name", str, "options.sd_model_checkpoint", labelled=False),
    Axis("Negative Guidance minimum sigma", float, "s_min_uncond"), Axis("Sigma Churn", float, "s_churn"),
    Axis("Sigma min", float, "s_tmin"), Axis("Sigma max", float, "s_tmax"), Axis("Sigma noise", float, "s_noise"),
    Axis("Schedule type", str, "scheduler"), Axis("Schedule min sigma", float, "options.sigma_min"),
    Axis("Schedule max sigma", float, "options.sigma_max"), Axis("Schedule rho", float, "options.rho"),
    Axis("Beta schedule alpha", float, "options.beta_dist_alpha"),
    Axis("Beta schedule beta", float, "options.beta_dist_beta"), Axis("Eta", float, "eta"),
    Axis("Clip skip", int, "options.CLIP_stop_at_last_layers"), Axis("Denoising", float, "denoising_strength"),
    Axis("Initial noise multiplier", float, "initial_noise_multiplier"),
    Axis("Extra noise", float, "options.img2img_extra_noise"),
    Axis("Hires upscaler", str, "hr_upscaler", (TXT2IMG,)),
    Axis("Cond. Image Mask Weight", tabs=(IMG2IMG,), why=ABSENT), Axis("VAE", str, "options.sd_vae"),
    Axis("Styles", str, "styles"), Axis("UniPC Order", int, "options.uni_pc_order"),
    Axis("Face restore", str, "face restore"),
    Axis("Token merging ratio", why=ABSENT), Axis("Token merging ratio high-res", why=ABSENT),
    Axis("Always discard next-to-last sigma", bool, "options.always_discard_next_to_last_sigma"),
    Axis("SGM noise multiplier", bool, "options.sgm_noise_multiplier"),
    Axis("Refiner checkpoint", str, "refiner_checkpoint", labelled=False),
    Axis("Refiner switch at", float, "refiner_switch_at"),
    Axis("RNG source", str, "options.randn_source", labelled=False), Axis("FP8 mode", why=ABSENT),
    Axis("Size", str, "size"),
)
XYZ_DEFAULTS = [1, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]
_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)\s*(?:\(\s*([+-]\s*\d+)\s*\)|\[\s*(\d+)\s*\])?\s*")
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
_FLOAT_RANGE = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})\s*(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?\s*")


def axes_of(tab: str) -> list[Axis]:
    return [axis for axis in AXES if tab in axis.tabs]


def find_axis(value: Any, tab: str, i: int) -> Axis:
    axes = axes_of(tab)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(axes):
        axis = axes[value]
    else:
        axis = next((a for a in axes if isinstance(value, str) and a.label.lower() == value.lower()), None)
    served = [a.label for a in axes if a.kind is not None]
    if axis is None:
        raise refuse(f"script_args[{i}]", f"an axis type: its index in A1111 1.10's {tab} list (0 to "
                                          f"{len(axes) - 1}) or its name; sdtrt serves {', '.join(served)}")
    if axis.kind is None:
        raise refuse(f"script_args[{i}]", f"the {axis.label!r} axis is not available ({axis.why}); sdtrt serves "
                                          f"{', '.join(served)}")
    return axis


def _expand(values: list[str], kind: type) -> list[Any]:
    """A1111's ranges: "1-5" (every integer), "1-9 (+2)" (a step), "1-10 [4]" (that many, evenly)."""
    out: list[Any] = []
    for value in values:
        found = (_INT_RANGE if kind is int else _FLOAT_RANGE).fullmatch(value)
        if found is None:
            out.append(value)
            continue
        start, end = (kind(g.replace(" ", "")) for g in found.groups()[:2])
        step, count = found.group(3), found.group(4)
        if count is not None:
            points = np.linspace(start, end, int(count)).tolist()
            out += [int(p) for p in points] if kind is int else points
        elif kind is int:
            out += list(range(start, end + 1, int(step.replace(" ", "")) if step else 1))
        else:
            out += np.arange(start, end + (float(step.replace(" ", "")) if step else 1.0),
                             float(step.replace(" ", "")) if step else 1.0).tolist()
        if len(out) > MAX_SCRIPT_GENERATIONS:
            break  # (bounded below)
    return out


def axis_values(axis: Axis, text: Any, dropdown: Any, csv_mode: bool, i: int) -> list[Any]:
    """An axis' values: its text (comma-separated, CSV quoting) or, for the axes A1111 offers a list of choices
    (samplers, schedules, checkpoints, ...), the list unless ``csv_mode``."""
    if axis.label == "Nothing":
        return [None]
    if not csv_mode and isinstance(dropdown, list) and dropdown:
        values = [str(v) for v in dropdown]
    else:
        if not isinstance(text, str) or len(text) > MAX_AXIS_CHARS:
            raise refuse(f"script_args[{i + 1}]", f"{axis.label} values: text of at most {MAX_AXIS_CHARS} characters")
        values = [v.strip() for v in itertools.chain.from_iterable(csv.reader(io.StringIO(text))) if v.strip()]
    if not values:
        raise refuse(f"script_args[{i + 1}]", f"{axis.label} values: at least one (comma-separated)")
    if axis.kind in (int, float):
        values = _expand(values, axis.kind)
    if axis.kind is tuple:  # Prompt order: every order of the tokens
        _bound(math.factorial(len(values)), f"a prompt order of {len(values)} tokens")
        return list(itertools.permutations(values))
    if axis.field == "size" and not all(re.fullmatch(r"\s*\d+\s*x\s*\d+\s*", v) for v in values):
        raise refuse(f"script_args[{i + 1}]", f"Size values: WIDTHxHEIGHT, such as 512x768 (got {str(values)[:80]})")
    if axis.kind is bool:  # A1111's boolean axes: its True / False choices
        if not all(v.lower() in ("true", "false") for v in values):
            raise refuse(f"script_args[{i + 1}]", f"{axis.label} values: True or False (got {str(values)[:80]})")
        return [v.lower() == "true" for v in values]
    try:
        return [axis.kind(v) for v in values]
    except ValueError:
        raise refuse(f"script_args[{i + 1}]", f"{axis.label} values: {axis.kind.__name__}s (got "
                                              f"{str(values)[:80]})") from None


def apply_axis(body: _Request, axis: Axis, value: Any, values: list[Any]) -> _Request:
    """The request with one axis value set, as A1111's axis applies it."""
    if axis.label == "Nothing":
        return body
    if axis.field == "prompt":  # Prompt S/R: the first value is searched for, each value put in its place
        if values[0] not in body.prompt and values[0] not in body.negative_prompt:
            raise refuse("script_args", f"Prompt S/R did not find {str(values[0])[:80]!r} in the prompt or the "
                                        "negative prompt")
        return variant(body, prompt=body.prompt.replace(values[0], value),
                       negative_prompt=body.negative_prompt.replace(values[0], value))
    if axis.field == "prompt order":
        return variant(body, prompt=reordered(body.prompt, value))
    if axis.field == "size":
        width, height = (int(v) for v in value.lower().split("x"))
        return variant(body, width=width, height=height)
    if axis.field == "styles":
        return variant(body, styles=[*(body.styles or []), *value.split(",")])
    if axis.field == "face restore":  # A1111's apply_face_restore: a restorer's name turns it on with that one
        named = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}.get(value.lower())
        overrides = {**(body.override_settings or {}), **({"face_restoration_model": named} if named else {})}
        return variant(body, restore_faces=named is not None or value.lower() in ("true", "yes", "y", "1"),
                       override_settings=overrides)
    if axis.field.startswith("options."):
        return variant(body, override_settings={**(body.override_settings or {}),
                                                axis.field.removeprefix("options."): value})
    return variant(body, **{axis.field: value})


def reordered(prompt: str, tokens: tuple[str, ...]) -> str:
    """A1111's Prompt order: the tokens taken out of the prompt where they first appear, in that order, and put
    back in the order given."""
    found = sorted((prompt.find(token), token) for token in tokens)
    if found and found[0][0] < 0:
        raise refuse("script_args", f"Prompt order did not find {found[0][1][:80]!r} in the prompt")
    parts, rest = [], prompt
    for _, token in found:
        at = rest.find(token)
        parts.append(rest[:at])
        rest = rest[at + len(token):]
    return "".join(part + token for part, token in zip(parts, tokens)) + rest


def _cell_label(axis: Axis, value: Any) -> str:
    if axis.label == "Nothing":
        return ""
    if isinstance(value, tuple):  # (A1111's format_value_join_list)
        return ", ".join(value)
    shown = round(value, 8) if isinstance(value, float) else value
    return f"{axis.label}: {shown}" if axis.labelled else str(shown)


def xyz_plot(body: _Request, args: list[Any], generate: Generate, init: list[Image.Image] | None) -> ScriptRun:
    """A grid of generations, one per combination of up to three axes' values (z: one grid each, side by side)."""
    tab = IMG2IMG if isinstance(body, Img2ImgBody) else TXT2IMG
    csv_mode = _flag(args, 17, "csv_mode")
    axes = [find_axis(args[3 * k], tab, 3 * k) for k in range(3)]
    values = [axis_values(axes[k], args[3 * k + 1], args[3 * k + 2], csv_mode, 3 * k) for k in range(3)]
    legend, lone, sub_grids, keep_random = (_flag(args, i, n) for i, n in (
        (9, "draw_legend"), (10, "include_lone_images"), (11, "include_sub_grids"), (12, "no_fixed_seeds")))
    vary = [_flag(args, 13 + k, f"vary_seeds_{'xyz'[k]}") for k in range(3)]
    margin = _number(args, 16, "margin_size", 0, 500)
    xs, ys, zs = values
    _bound(len(xs) * len(ys) * len(zs) * body.n_iter, f"an X/Y/Z plot of {len(xs)} x {len(ys)} x {len(zs)} cells "
                                                      f"and {body.n_iter} batches each")
    if not keep_random:
        body = variant(body, seed=fixed_seed(body))
        values = [[random.randint(0, MAX_SEED) if a.label in ("Seed", "Var. seed") and v == -1 else v for v in vs]
                  for a, vs in zip(axes, values)]
        xs, ys, zs = values
    cells: dict[tuple[int, int, int], Generation] = {}
    for iz, iy, ix in itertools.product(range(len(zs)), range(len(ys)), range(len(xs))):
        cell = body
        for axis, value, all_values in zip(axes, (xs[ix], ys[iy], zs[iz]), values):
            cell = apply_axis(cell, axis, value, all_values)
        offset = (ix if vary[0] else 0) + (iy * len(xs) if vary[1] else 0) + (iz * len(xs) * len(ys) if vary[2] else 0)
        if offset and cell.seed not in (None, -1):
            cell = variant(cell, seed=cell.seed + offset)
        one = generate(cell, init)
        if not len(one.images):
            break  # interrupted
        cells[(ix, iy, iz)] = one
    return _xyz_pictures(cells, axes, values, args, (legend, lone, sub_grids, margin))


def _xyz_pictures(cells: dict, axes: list[Axis], values: list[list[Any]], args: list[Any],
                  how: tuple[bool, bool, bool, int]) -> ScriptRun:
    """The plot's pictures as A1111 returns them: the grid of grids, then (asked for) each z's grid, then (asked
    for) every cell's first picture; a cell not drawn (interrupted) is black."""
    legend, lone, sub_grids, margin = how
    xs, ys, zs = values
    if not cells:
        return ScriptRun([], [], [])
    first = next(iter(cells.values()))
    height, width = first.images[0].shape[:2]
    ordered = [(ix, iy, iz) for iz in range(len(zs)) for iy in range(len(ys)) for ix in range(len(xs))]
    pictures = [Image.fromarray(cells[k].images[0]) if k in cells else Image.new("RGB", (width, height))
                for k in ordered]
    seeds = [cells[k].seeds[0] if k in cells else -1 for k in ordered]
    texts = [cells[k].infotexts[0] if k in cells else "" for k in ordered]
    per_z = len(xs) * len(ys)
    grids = []
    for iz in range(len(zs)):
        grid = image_grid(pictures[iz * per_z:(iz + 1) * per_z], rows=len(ys))
        if legend:
            grid = annotate_grid(grid, width, height, [[Label(_cell_label(axes[0], x))] for x in xs],
                                 [[Label(_cell_label(axes[1], y))] for y in ys], margin)
        grids.append(grid)
    top = image_grid(grids, rows=1)
    if legend:
        top = annotate_grid(top, grids[0].width, grids[0].height, [[Label(_cell_label(axes[2], z))] for z in zs],
                            [[Label()]])
    params = {"Script": "X/Y/Z plot"}
    for k, name in enumerate("XYZ"):
        if axes[k].label != "Nothing":
            params[f"{name} Type"] = axes[k].label
            params[f"{name} Values"] = args[3 * k + 1] if isinstance(args[3 * k + 1], str) and args[3 * k + 1] \
                else ", ".join(map(str, values[k]))
            if axes[k].label in ("Seed", "Var. seed"):
                params[f"Fixed {name} Values"] = ", ".join(map(str, values[k]))
    head = with_params(texts[0], params) if texts[0] else ""
    images, out_seeds, infos = [_array(top)], [seeds[0]], [head]
    if sub_grids:
        images += [_array(g) for g in grids]
        out_seeds += [seeds[iz * per_z] for iz in range(len(zs))]
        infos += [texts[iz * per_z] for iz in range(len(zs))]
    if lone:
        images += [np.asarray(p) for p in pictures]
        out_seeds += seeds
        infos += texts
    return ScriptRun(images, out_seeds, infos, 1)


# --- Loopback ------------------------------------------------------------------------------------------------
LOOPBACK_INTERROGATORS = {"CLIP": CLIP_INTERROGATOR, "DeepBooru": DEEPBOORU}  # "Append interrogated prompt"


def loopback(body: _Request, args: list[Any], generate: Generate, init: list[Image.Image] | None) -> ScriptRun:
    """img2img again on its own output ``loops`` times, the denoising strength moving to the final one along
    the curve, the seed + 1 each pass; with several batches, each starts from the picture sent."""
    loops = _number(args, 0, "loops", 1, 32)
    final = _number(args, 1, "final_denoising_strength", 0, 1, float)
    curve = _choice(args, 2, "denoising_curve", ("Aggressive", "Linear", "Lazy"))
    interrogation = _choice(args, 3, "append_interrogation", ("None", "CLIP", "DeepBooru"))
    batches = body.n_iter
    _bound(loops * batches, f"{loops} loops of {batches} batches")
    first = body.denoising_strength if body.denoising_strength is not None else 0.75

    def strength(loop: int) -> float:
        if loops == 1:
            return first
        progress = loop / (loops - 1)
        shaped = {"Aggressive": math.sin(progress * math.pi * 0.5),
                  "Lazy": 1 - math.cos(progress * math.pi * 0.5)}.get(curve, progress)
        return first + (final - first) * shaped

    params = {"Final denoising strength": final, "Denoising curve": curve}
    seed = fixed_seed(body)
    history, seeds, texts = [], [], []
    stopped = False
    for _ in range(batches):
        pictures, denoise, fill = init, first, body.inpainting_fill
        last = None
        for loop in range(loops):
            prompt = {}
            if interrogation != "None":  # (A1111: the prompt sent, then the interrogation of this pass's picture)
                tags = generate.interrogate(pictures[0], LOOPBACK_INTERROGATORS[interrogation])
                prompt = {"prompt": f"{body.prompt}, {tags}" if body.prompt else tags}
            one = generate(variant(body, seed=seed, denoising_strength=denoise, inpainting_fill=fill, n_iter=1,
                                   batch_size=1, **prompt), pictures)
            if not len(one.images):
                stopped = True
                break
            seed, denoise, fill = one.seeds[0] + 1, strength(loop + 1), 1  # then "original" (A1111's 1)
            last = (one.images[0], one.seeds[0], with_params(one.infotexts[0], params))
            pictures = [Image.fromarray(one.images[0])]
            if batches == 1:
                history.append(last)
        if batches > 1 and last is not None and not stopped:
            history.append(last)
        if stopped:
            break
    images = [h[0] for h in history]
    seeds, texts = [h[1] for h in history], [h[2] for h in history]
    if len(history) > 1:
        grid = image_grid([Image.fromarray(im) for im in images], rows=1)
        return ScriptRun([_array(grid), *images], [seeds[0], *seeds], [texts[0], *texts], 1)
    return ScriptRun(images, seeds, texts)


# --- SD upscale ----------------------------------------------------------------------------------------------
def sd_upscale(body: _Request, args: list[Any], generate: Generate, init: list[Image.Image] | None) -> ScriptRun:
    """Upscale the picture, cut it into tiles of the request's width x height overlapping by ``overlap``, redraw
    each tile with img2img (batch_size tiles at a time, the seed + 1 each batch), and blend them back."""
    overlap = _number(args, 1, "overlap", 0, 256)
    models = generate.upscalers()
    names = [*EXTRAS_UPSCALERS, *models.models]  # (A1111's order: its own, then the models)
    upscaler = args[2] if args[2] in names else None
    if upscaler is None:
        upscaler = names[_number(args, 2, f"upscaler_index (0 to {len(names) - 1}: {', '.join(names)})", 0,
                                 len(names) - 1)]
    scale = _number(args, 3, "scale_factor", 1, 8, float)
    if getattr(body, "mask", None):
        raise refuse("mask", "SD upscale redraws the whole picture: send it without a mask")
    if overlap >= min(body.width, body.height):
        raise refuse("script_args[1]", f"overlap: less than the tile's sides ({body.width}x{body.height}, the "
                                       f"request's width and height; got {overlap})")
    picture = init[0]
    size = (int(picture.width * scale // 8 * 8), int(picture.height * scale // 8 * 8))
    if upscaler != NO_UPSCALER and max(size) > MAX_SIDE:
        raise refuse("script_args[3]", f"scale_factor: the upscaled picture would be {size[0]}x{size[1]}; at most "
                                       f"{MAX_SIDE} a side")
    if upscaler in models.models:  # a model's passes make their whole picture, each bounded before it runs
        try:
            check_upscale(picture.size, ExtrasUpscale(upscaler, scale=scale), {upscaler: models.models[upscaler].scale})
        except InvalidRequest as exc:
            raise refuse("script_args[3]", f"scale_factor: {exc}") from None
    big = upscale_by(picture, upscaler, scale, models) if upscaler != NO_UPSCALER else picture
    if big.width < body.width or big.height < body.height:
        raise refuse("script_args[3]", f"scale_factor: the upscaled picture ({big.width}x{big.height}) is smaller "
                                       f"than a tile ({body.width}x{body.height}, the request's width and height)")
    tiles = split_tiles(big, body.width, body.height, overlap)
    work = tiles.pictures
    per_batch = max(1, body.batch_size)
    batches = math.ceil(len(work) / per_batch)
    _bound(batches * body.n_iter, f"SD upscale of {len(work)} tiles in batches of {per_batch}, {body.n_iter} times")
    params = {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler}
    seed = fixed_seed(body)
    images, seeds, texts = [], [], []
    for n in range(body.n_iter):
        batch_seed, redrawn, first_text = seed + n, [], None
        for i in range(batches):
            one = generate(variant(body, seed=batch_seed, n_iter=1, batch_size=len(work[i * per_batch:][:per_batch])),
                           work[i * per_batch:(i + 1) * per_batch])
            if not len(one.images):
                break
            first_text = first_text or one.infotexts[0]
            batch_seed = one.seeds[0] + 1
            redrawn += [Image.fromarray(im) for im in one.images]
        if not redrawn:
            break
        redrawn += [Image.new("RGB", (body.width, body.height))] * (len(work) - len(redrawn))
        images.append(_array(combine_tiles(tiles, redrawn)))
        seeds.append(seed + n)
        texts.append(with_params(first_text, params))
    return ScriptRun(images, seeds, texts)


@dataclass(frozen=True)
class Arg:
    """One of a script's arguments as A1111's /sdapi/v1/script-info describes it (its UI control)."""

    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Script:
    title: str
    tabs: tuple[str, ...]
    defaults: tuple[Any, ...]  # A1111's UI defaults, in script_args' order
    run: Callable[[_Request, list[Any], Generate, "list[Image.Image] | None"], ScriptRun]
    args: tuple[Arg, ...] = ()  # what each default is, in the same order


def _xyz_args() -> tuple[Arg, ...]:
    axis = ("Type", "Values", "Values (dropdown)")
    args = [Arg(f"{name} {part}") for name in "XYZ" for part in axis]
    flags = ("Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds", "Vary seeds for X",
             "Vary seeds for Y", "Vary seeds for Z")
    return (*args, *(Arg(label) for label in flags), Arg("Grid margins (px)", 0, 500, 2), Arg("Use text inputs"))


SCRIPTS = {s.title.lower(): s for s in (
    Script("Prompt matrix", (TXT2IMG, IMG2IMG), (False, False, "positive", "comma", 0), prompt_matrix,
           (Arg("Put variable parts at start of prompt"), Arg("Use different seed for each picture"),
            Arg("Select prompt", choices=("positive", "negative")),
            Arg("Select joining char", choices=("comma", "space")), Arg("Grid margins (px)", 0, 500, 2))),
    Script("X/Y/Z plot", (TXT2IMG, IMG2IMG), tuple(XYZ_DEFAULTS), xyz_plot, _xyz_args()),
    Script("Loopback", (IMG2IMG,), (4, 0.5, "Linear", "None"), loopback,
           (Arg("Loops", 1, 32, 1), Arg("Final denoising strength", 0, 1, 0.01),
            Arg("Denoising strength curve", choices=("Aggressive", "Linear", "Lazy")),
            Arg("Append interrogated prompt at each iteration", choices=("None", "DeepBooru")))),
    Script("SD upscale", (IMG2IMG,), (None, 64, 0, 2.0), sd_upscale,
           (Arg("Will upscale the image by the selected scale factor; use width and height sliders to set tile "
                "size"), Arg("Tile overlap", 0, 256, 16), Arg("Upscaler", choices=tuple(EXTRAS_UPSCALERS)),
            Arg("Scale Factor", 1.0, 4.0, 0.05))),
)}


def script_info(upscalers: Sequence[str] = ()) -> list[dict[str, Any]]:
    """/sdapi/v1/script-info: each tab's scripts with their arguments' labels, defaults and ranges, as A1111's
    ScriptInfo lists them (txt2img's, then img2img's); an Upscaler argument's choices end with the server's
    ``upscalers`` (its upscaler models), as A1111's list its own."""
    info = []
    for tab in (TXT2IMG, IMG2IMG):
        for name in script_titles(tab):
            script = SCRIPTS[name]
            args = [{"label": a.label, "value": value, "minimum": a.minimum, "maximum": a.maximum, "step": a.step,
                     "choices": None if a.choices is None else
                     [*a.choices, *upscalers] if a.label == "Upscaler" else list(a.choices)}
                    for a, value in zip(script.args, script.defaults)]
            info.append({"name": name, "is_alwayson": False, "is_img2img": tab == IMG2IMG, "args": args})
    return info


def script_titles(tab: str) -> list[str]:
    """The scripts of a tab, as A1111's /sdapi/v1/scripts names them (lower case)."""
    return [name for name, s in SCRIPTS.items() if tab in s.tabs]


def find_script(body: _Request, tab: str) -> tuple[Script, list[Any]] | None:
    """The script a request names (A1111 matches titles without case) with its arguments, defaults filled; None
    without one; a 422 naming the tab's scripts for one sdtrt lacks."""
    if not body.script_name:
        if body.script_args:
            raise refuse("script_args", "arguments for no script: name one in script_name")
        return None
    script = SCRIPTS.get(body.script_name.lower())
    if script is None or tab not in script.tabs:
        raise refuse("script_name", f"{body.script_name[:80]!r} is not one of sdtrt's {tab} scripts: "
                                    f"{', '.join(script_titles(tab))}")
    if len(body.script_args) > len(script.defaults):
        raise refuse("script_args", f"{script.title} takes at most {len(script.defaults)} arguments (got "
                                    f"{len(body.script_args)})")
    args = list(body.script_args) + list(script.defaults[len(body.script_args):])
    return script, [d if a is None and d is not None else a for a, d in zip(args, script.defaults)]
