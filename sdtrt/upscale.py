"""A1111's Extras upscale (``/sdapi/v1/extra-single-image``) with the upscalers sdtrt has: PIL's.

A1111's rules, kept so that the same request gives the same size: the size is the scale times the picture's,
rounded down to a multiple of 8; "upscale to" scales by the larger of the two ratios and, with crop, centres the
result on a canvas of exactly the target size; a second upscaler is blended in at its visibility.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from sdtrt.hires import HIRES_UPSCALERS

EXTRAS_UPSCALERS = {name: u for name, u in HIRES_UPSCALERS.items() if not u.latent_mode}
NO_UPSCALER = "None"
MAX_SIDE = 8192  # pixels; a bigger picture is refused rather than allocated


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


def _upscale(image: Image.Image, name: str, scale: float) -> Image.Image:
    """One upscaler, as A1111's Upscaler.upscale: its own resize to the scaled size, then Lanczos down to the
    size rounded to a multiple of 8."""
    width, height = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
    out = image.resize((int(image.width * scale), int(image.height * scale)), resample=EXTRAS_UPSCALERS[name].resample)
    if out.size != (width, height):
        out = out.resize((width, height), resample=Image.Resampling.LANCZOS)
    return out


def target_scale(image: Image.Image, job: ExtrasUpscale) -> float:
    return max(job.width / image.width, job.height / image.height) if job.resize_mode == 1 else job.scale


def output_size(image: Image.Image, job: ExtrasUpscale) -> tuple[int, int]:
    if job.upscaler_1 == NO_UPSCALER:
        return image.size
    if job.resize_mode == 1 and job.crop:
        return job.width, job.height
    scale = target_scale(image, job)
    return int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)


def extras_upscale(image: Image.Image, job: ExtrasUpscale) -> tuple[Image.Image, dict[str, str]]:
    """The upscaled picture and A1111's "Postprocess ..." infotext entries for it."""
    if job.upscaler_1 == NO_UPSCALER:
        return image, {}
    scale = target_scale(image, job)
    info = {"Postprocess upscale to": f"{job.width}x{job.height}"} if job.resize_mode == 1 else \
        {"Postprocess upscale by": f"{job.scale:g}"}
    info["Postprocess upscaler"] = job.upscaler_1
    out = _upscale(image, job.upscaler_1, scale)
    if job.upscaler_2 != NO_UPSCALER and job.upscaler_2_visibility > 0:
        out = Image.blend(out, _upscale(image, job.upscaler_2, scale), job.upscaler_2_visibility)
        info["Postprocess upscaler 2"] = job.upscaler_2
    if job.resize_mode == 1 and job.crop:
        canvas = Image.new("RGB", (job.width, job.height))
        canvas.paste(out, box=(job.width // 2 - out.width // 2, job.height // 2 - out.height // 2))
        out = canvas
        info["Postprocess crop to"] = f"{job.width}x{job.height}"
    return out, info
