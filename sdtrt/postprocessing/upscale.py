"""A1111's Extras upscale (``/sdapi/v1/extra-single-image``, ``extra-batch-images``) with the upscalers sdtrt has:
PIL's, and the upscaler models a model was exported with (run by ``sdtrt.postprocessing.model_upscale``).

A1111's rules, kept so that the same request gives the same size: the size is the scale times the picture's,
rounded down to a multiple of 8; "upscale to" scales by the larger of the two ratios and, with crop, centres the
result on a canvas of exactly the target size; a second upscaler is blended in at its visibility.

The work is bounded before anything is allocated (:func:`check_upscale`, which :func:`extras_upscale` calls too):
the result at most ``MAX_SIDE`` pixels a side and ``MAX_UPSCALE_PIXELS`` in all, and the picture an upscaler makes
before the rounding to 8 (its "intermediate") at most ``MAX_INTERMEDIATE_PIXELS``. With crop, A1111's way makes the
whole scaled picture first and keeps the middle: a 64 x 8192 picture cropped to 8192 x 8192 is scaled by 128 to
8192 x 1,048,576 pixels (24 GiB) for 8192 rows of it. When that whole picture would be over the bound, sdtrt makes
only the part that survives the crop (PIL's resize of a source box), so such a request costs what its result does;
below the bound it goes A1111's way, pixel for pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.hires import HIRES_UPSCALERS, Tiling
from sdtrt.postprocessing import model_upscale

EXTRAS_UPSCALERS = {name: u for name, u in HIRES_UPSCALERS.items() if not u.latent_mode}
NO_UPSCALER = "None"
MAX_SIDE = 8192  # pixels; a bigger picture is refused rather than allocated
MAX_UPSCALE_PIXELS = MAX_SIDE * MAX_SIDE  # the result: 64 Mpixels, 192 MiB as RGB
# An upscaler's own size is the result's before rounding down to a multiple of 8: up to 7 pixels more a side.
MAX_INTERMEDIATE_PIXELS = (MAX_SIDE + 8) * (MAX_SIDE + 8)
_LIMIT = f"at most {MAX_SIDE} pixels a side and {MAX_UPSCALE_PIXELS} pixels in all"
CROP_STRIP_ROWS = 512  # rows of a cropped upscale made at a time (12 MiB of an 8192-wide RGB picture)
LANCZOS_SUPPORT = 3.0  # PIL's Lanczos filter reaches 3 source pixels (times the downscale) from a pixel's centre


@dataclass(frozen=True)
class ExtrasUpscale:
    upscaler_1: str = NO_UPSCALER
    upscaler_2: str = NO_UPSCALER
    upscaler_2_visibility: float = 0.0
    resize_mode: int = 0  # 0: by ``scale``; 1: to ``width`` x ``height``
    scale: float = 2.0
    width: int = 512
    height: int = 512
    crop: bool = True


def _size_of(image: Image.Image | tuple[int, int]) -> tuple[int, int]:
    return image.size if isinstance(image, Image.Image) else (int(image[0]), int(image[1]))


def target_scale(image: Image.Image | tuple[int, int], job: ExtrasUpscale) -> float:
    width, height = _size_of(image)
    return max(job.width / width, job.height / height) if job.resize_mode == 1 else job.scale


def _scaled(size: tuple[int, int], scale: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(an upscaler's own size, that size rounded down to a multiple of 8), as A1111's Upscaler.upscale."""
    width, height = size
    return ((int(width * scale), int(height * scale)),
            (int(width * scale // 8 * 8), int(height * scale // 8 * 8)))


def intermediate_size(image: Image.Image | tuple[int, int], job: ExtrasUpscale) -> tuple[int, int]:
    """The size of the scaled picture before any crop (A1111 makes it whole; sdtrt only when within bounds), before
    the rounding down to a multiple of 8."""
    if job.upscaler_1 == NO_UPSCALER:
        return _size_of(image)
    return _scaled(_size_of(image), target_scale(image, job))[0]


def scaled_size(image: Image.Image | tuple[int, int], job: ExtrasUpscale) -> tuple[int, int]:
    """The size of the scaled picture, rounded down to a multiple of 8, before any crop."""
    if job.upscaler_1 == NO_UPSCALER:
        return _size_of(image)
    return _scaled(_size_of(image), target_scale(image, job))[1]


def output_size(image: Image.Image | tuple[int, int], job: ExtrasUpscale) -> tuple[int, int]:
    """The size of the result."""
    if job.upscaler_1 == NO_UPSCALER:
        return _size_of(image)
    if job.resize_mode == 1 and job.crop:
        return job.width, job.height
    return scaled_size(image, job)


def _fits(size: tuple[int, int], most: int) -> bool:
    return max(size) <= MAX_SIDE and size[0] * size[1] <= most


def _cropped_in_full(job: ExtrasUpscale, image_size: tuple[int, int]) -> bool:
    """Whether a cropped upscale is done A1111's way, making the whole scaled picture (else only its middle)."""
    width, height = intermediate_size(image_size, job)
    return width * height <= MAX_INTERMEDIATE_PIXELS


def model_passes(size: tuple[int, int], scale: float, model_scale: int) -> list[tuple[int, int]]:
    """The sizes an upscaler model's passes make of a picture of ``size`` for ``scale`` (A1111's Upscaler.upscale:
    until it covers the target, three at the most)."""
    dest = (int(size[0] * scale // 8 * 8), int(size[1] * scale // 8 * 8))
    made = []
    for i in range(3):
        if size[0] >= dest[0] and size[1] >= dest[1] and (i > 0 or scale != 1) or model_scale == 1 and made:
            break
        size = (size[0] * model_scale, size[1] * model_scale)
        made.append(size)
    return made


def check_upscale(image_size: tuple[int, int], job: ExtrasUpscale, models: dict[str, int] | None = None) -> None:
    """Refuse, before any pixel is made, an upscale whose result or intermediate picture would be over the bounds,
    naming A1111's field: ``upscaling_resize`` for resize mode 0, ``upscaling_resize_w`` / ``upscaling_resize_h``
    (the one whose ratio decides the scale) for mode 1. Also refuses what the sizes cannot be worked out from.
    ``models``: the upscaler models a request may name, with their scales."""
    models = models or {}
    for field, name in (("upscaler_1", job.upscaler_1), ("upscaler_2", job.upscaler_2)):
        if name not in EXTRAS_UPSCALERS and name not in models:
            raise InvalidRequest(field, name, f"one of {', '.join(map(repr, [*EXTRAS_UPSCALERS, *models]))}")
    visibility = job.upscaler_2_visibility
    if not isinstance(visibility, (int, float)) or not 0 <= visibility <= 1:
        raise InvalidRequest("extras_upscaler_2_visibility", visibility, "a number from 0 to 1")
    if job.upscaler_1 == NO_UPSCALER:
        return
    width, height = image_size
    if job.resize_mode not in (0, 1):
        raise InvalidRequest("resize_mode", job.resize_mode,
                             "0 (by upscaling_resize) or 1 (to upscaling_resize_w x upscaling_resize_h)")
    if job.resize_mode == 0:
        field, value = "upscaling_resize", job.scale
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidRequest(field, value, "a number above 0")
    else:
        for field, value in (("upscaling_resize_w", job.width), ("upscaling_resize_h", job.height)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
                raise InvalidRequest(field, value, f"a whole number of pixels from 1 to {MAX_SIDE}")
        field, value = (("upscaling_resize_w", job.width) if job.width / width >= job.height / height
                        else ("upscaling_resize_h", job.height))
    crop = job.resize_mode == 1 and job.crop
    scale = target_scale(image_size, job)
    if max(width, height) * scale > 2 * MAX_SIDE and (not crop or {job.upscaler_1, job.upscaler_2} & set(models)):
        # (before any int(): a huge float makes no int; a model makes the whole picture even when cropped)
        raise InvalidRequest(field, value, f"a size whose result is {_LIMIT} (this makes about "
                             f"{width * scale:.6g}x{height * scale:.6g} from {width}x{height}{_how(job)})")
    scaled = scaled_size(image_size, job)
    made = f"{'x'.join(map(str, scaled))} from {width}x{height}"
    if min(scaled) < 1:
        raise InvalidRequest(field, value, f"a size that scales the picture to at least 8 pixels a side (sizes are "
                             f"rounded down to a multiple of 8; this makes {made})")
    for name in {job.upscaler_1, job.upscaler_2} & set(models):  # each model pass makes its whole picture
        for made in model_passes(image_size, scale, models[name]):
            if made[0] * made[1] > MAX_INTERMEDIATE_PIXELS:
                raise InvalidRequest(field, value, f"a size whose upscaler {name!r} makes at most "
                                     f"{MAX_INTERMEDIATE_PIXELS} pixels (its x{models[name]} passes make "
                                     f"{made[0]}x{made[1]} from {width}x{height})")
    if crop:
        return  # the result is the target size; the scaled picture is made whole only within bounds
    if not _fits(scaled, MAX_UPSCALE_PIXELS):
        raise InvalidRequest(field, value, f"a size whose result is {_LIMIT} (this makes {made}{_how(job)})")
    inter = intermediate_size(image_size, job)
    if inter[0] * inter[1] > MAX_INTERMEDIATE_PIXELS:
        raise InvalidRequest(field, value, f"a size whose upscaler makes at most {MAX_INTERMEDIATE_PIXELS} pixels "
                             f"(this makes {inter[0]}x{inter[1]} before rounding down to a multiple of 8)")


def _how(job: ExtrasUpscale) -> str:
    if job.resize_mode == 1:
        return ("; without upscaling_crop the picture keeps its shape, scaled by the larger of the two ratios as "
                "A1111 does: set upscaling_crop for exactly that size")
    return ""


def upscale_by(image: Image.Image, name: str, scale: float, models: "ModelUpscalers | None" = None) -> Image.Image:
    """One upscaler, as A1111's Upscaler.upscale: its own resize to the scaled size (a model's passes:
    sdtrt.postprocessing.model_upscale), then Lanczos down to the size rounded to a multiple of 8."""
    if models is not None and name in models.models:
        return model_upscale.upscale_by(image, models.models[name], scale, models.tiling)
    (own_w, own_h), (width, height) = _scaled(image.size, scale)
    out = image.resize((own_w, own_h), resample=EXTRAS_UPSCALERS[name].resample)
    if out.size != (width, height):
        out = out.resize((width, height), resample=Image.Resampling.LANCZOS)
    return out


def _nearest_columns(n_in: int, n_out: int, start: int, stop: int) -> "np.ndarray":
    """The source columns (or rows) of output pixels ``start``..``stop`` of PIL's nearest-neighbour resize from
    ``n_in`` to ``n_out``: PIL steps a double by n_in / n_out from half a step (ImagingScaleAffine), and
    numpy's cumulative sum adds the same doubles in the same order."""
    step = n_in / n_out
    steps = np.full(stop, step)
    steps[0] = step * 0.5
    return np.minimum(np.cumsum(steps)[start:stop].astype(np.int64), n_in - 1)


def _resize_part(image: Image.Image, resample: int, size: tuple[int, int], part: tuple[int, int, int, int],
                 pixels: "np.ndarray | None" = None) -> Image.Image:
    """The ``part`` (left, top, right, bottom) of ``image.resize(size, resample)``, without making the rest:
    nearest neighbour exactly (the same source pixels), other filters as PIL's resize of the source box those
    pixels come from (the same filter at the same positions, up to rounding: at most 1 level apart)."""
    left, top, right, bottom = part
    if resample == Image.Resampling.NEAREST:
        pixels = np.asarray(image) if pixels is None else pixels
        rows = _nearest_columns(image.height, size[1], top, bottom)
        columns = _nearest_columns(image.width, size[0], left, right)
        return Image.fromarray(np.ascontiguousarray(pixels[np.ix_(rows, columns)]))
    fx, fy = image.width / size[0], image.height / size[1]
    return image.resize((right - left, bottom - top), resample=resample,
                        box=(left * fx, top * fy, right * fx, bottom * fy))


def _upscale_part(image: Image.Image, name: str, scale: float, part: tuple[int, int, int, int],
                  pixels: "np.ndarray | None" = None) -> Image.Image:
    """The ``part`` (left, top, right, bottom, in the scaled picture's pixels) of what :func:`_upscale` makes,
    without making the rest (``pixels``: the picture's as numpy, when already at hand)."""
    (own_w, own_h), (width, height) = _scaled(image.size, scale)
    resample = EXTRAS_UPSCALERS[name].resample
    if (own_w, own_h) == (width, height):
        return _resize_part(image, resample, (own_w, own_h), part, pixels)
    # The Lanczos step down to the multiple of 8 reads the upscaler's pixels within its support of each centre.
    left, top, right, bottom = part
    sx, sy = own_w / width, own_h / height
    reach = LANCZOS_SUPPORT * max(sx, sy) + 2
    i_left, i_top = max(0, math.floor(left * sx - reach)), max(0, math.floor(top * sy - reach))
    i_right, i_bottom = min(own_w, math.ceil(right * sx + reach)), min(own_h, math.ceil(bottom * sy + reach))
    inner = _resize_part(image, resample, (own_w, own_h), (i_left, i_top, i_right, i_bottom), pixels)
    return inner.resize((right - left, bottom - top), resample=Image.Resampling.LANCZOS,
                        box=(left * sx - i_left, top * sy - i_top, right * sx - i_left, bottom * sy - i_top))


@dataclass(frozen=True)
class ModelUpscalers:
    """The upscaler models an Extras request names, with A1111's tiling options for them (ESRGAN_tile, SWIN_tile)."""

    models: dict[str, model_upscale.ModelUpscaler]
    tiling: Tiling = Tiling()


def extras_upscale(image: Image.Image, job: ExtrasUpscale, models: ModelUpscalers | None = None
                   ) -> tuple[Image.Image, dict[str, str]]:
    """The upscaled picture and A1111's "Postprocess ..." infotext entries for it (``models``: the upscaler models
    the job names, A1111's way in full: their passes make the whole picture, cropped or not)."""
    scales = {name: m.scale for name, m in models.models.items()} if models is not None else {}
    check_upscale(image.size, job, scales)
    if job.upscaler_1 == NO_UPSCALER:
        return image, {}
    scale = target_scale(image, job)
    info = {"Postprocess upscale to": f"{job.width}x{job.height}"} if job.resize_mode == 1 else \
        {"Postprocess upscale by": f"{job.scale:g}"}
    info["Postprocess upscaler"] = job.upscaler_1
    names = [job.upscaler_1] + ([job.upscaler_2] if job.upscaler_2 != NO_UPSCALER and job.upscaler_2_visibility > 0
                                else [])
    crop = job.resize_mode == 1 and job.crop
    if crop and not _cropped_in_full(job, image.size) and not set(names) & set(scales):
        out = _cropped(image, job, names, scale)
    else:
        out = upscale_by(image, names[0], scale, models)
        if len(names) > 1:
            out = Image.blend(out, upscale_by(image, names[1], scale, models), job.upscaler_2_visibility)
        if crop:
            canvas = Image.new("RGB", (job.width, job.height))
            canvas.paste(out, box=(job.width // 2 - out.width // 2, job.height // 2 - out.height // 2))
            out = canvas
    if len(names) > 1:
        info["Postprocess upscaler 2"] = job.upscaler_2
    if crop:
        info["Postprocess crop to"] = f"{job.width}x{job.height}"
    return out, info


def _cropped(image: Image.Image, job: ExtrasUpscale, names: list[str], scale: float) -> Image.Image:
    """A1111's crop (the scaled picture centred on a black canvas of the target size), making only the scaled
    picture's pixels that land on the canvas, a strip of rows at a time: the memory is the canvas's and a strip's."""
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    pixels = np.asarray(image) if any(EXTRAS_UPSCALERS[n].resample == Image.Resampling.NEAREST for n in names) else None
    width, height = scaled_size(image, job)
    x, y = job.width // 2 - width // 2, job.height // 2 - height // 2  # where the scaled picture's corner goes
    left, top, right, bottom = max(0, -x), max(0, -y), min(width, job.width - x), min(height, job.height - y)
    canvas = Image.new("RGB", (job.width, job.height))
    for row in range(top, bottom, CROP_STRIP_ROWS):
        part = (left, row, right, min(bottom, row + CROP_STRIP_ROWS))
        strip = _upscale_part(image, names[0], scale, part, pixels)
        if len(names) > 1:
            strip = Image.blend(strip, _upscale_part(image, names[1], scale, part, pixels), job.upscaler_2_visibility)
        canvas.paste(strip, box=(x + left, y + row))
    return canvas
