"""What a txt2img run gives back, and the infotext that describes each image."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sdtrt.infotext import build_infotext
from sdtrt.request import Img2ImgRequest, Txt2ImgRequest


@dataclass
class Generation:
    images: np.ndarray  # [N, H, W, 3] uint8
    seeds: list[int]  # seed of each image (request seed + i)
    infotexts: list[str]  # AUTOMATIC1111 infotext of each image


def infotexts(request: Txt2ImgRequest, seeds: list[int], model_name: str, model_hash: str,
              inpaint: bool = False) -> list[str]:
    """One infotext per image, with that image's own seed, the fields in A1111's order; unused ones left out."""
    img2img = isinstance(request, Img2ImgRequest)
    hires = request.enable_hr and not img2img
    texts = []
    for i, seed in enumerate(seeds):
        varied = request.subseed_strength > 0
        params = {
            "Steps": request.steps,
            "Sampler": request.sampler,
            "Schedule type": None if request.schedule_type == "Automatic" else request.schedule_type,
            "CFG scale": request.guidance_scale,
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model hash": model_hash,
            "Model": model_name,
            "Denoising strength": request.denoising_strength if img2img or hires else None,
            "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
            "Variation seed": request.subseed + i if varied else None,
            "Variation seed strength": request.subseed_strength if varied else None,
            "Resize mode": request.resize_mode if img2img and request.resize_mode != "Just resize" else None,
            "Mask blur": request.mask_blur if inpaint else None,
            "Inpaint area": "Only masked" if inpaint and request.inpaint_full_res else None,
            "Masked area padding": request.inpaint_full_res_padding if inpaint and request.inpaint_full_res else None,
            "Hires upscale": request.hr_scale if hires else None,
            "Hires steps": request.hr_second_pass_steps if hires and request.hr_second_pass_steps else None,
            "Hires upscaler": request.hr_upscaler if hires else None,
        }
        texts.append(build_infotext(request.prompt, request.negative_prompt, params))
    return texts


def batch_count(request: Txt2ImgRequest, n_iter: int) -> list[Txt2ImgRequest]:
    """A1111's "Batch count": n_iter requests one after another, seeds continuing (seed + j * batch_size)."""
    if n_iter < 1:
        from sdtrt.errors import InvalidRequest

        raise InvalidRequest("n_iter", n_iter, "an integer, >= 1")
    step = request.batch_size
    return [replace(request, seed=request.seed + j * step, subseed=request.subseed + j * step) for j in range(n_iter)]


def concatenate(generations: list[Generation]) -> Generation:
    return Generation(
        np.concatenate([g.images for g in generations]),
        [s for g in generations for s in g.seeds],
        [t for g in generations for t in g.infotexts],
    )
