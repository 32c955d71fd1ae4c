"""img2img, inpainting and hires fix in-process, against diffusers' img2img/inpaint pipelines or invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from reference import (
    MAX_PIXEL_DIFF, diffusers_img2img, diffusers_images, diffusers_inpaint, max_diff, reference_scheduler, sample_mask,
    sample_picture,
)
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.img2img import prepare_images
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest

PICTURE = sample_picture(64, 64)
MASK = sample_mask(64, 64)


@pytest.mark.parametrize("sampler,strength", [("Euler a", 0.6), ("DDIM", 0.75), ("DPM++ 2M Karras", 0.5), ("Euler", 1.0)])
def test_img2img_matches_diffusers(local_pipeline, diffusers_pipe, sampler, strength):
    request = Img2ImgRequest(prompt="a watercolor", negative_prompt="blurry", sampler=sampler, steps=10,
                             guidance_scale=7.0, seed=21, width=64, height=64, batch_size=2,
                             denoising_strength=strength)
    result = local_pipeline.img2img(request, PICTURE)
    expected = diffusers_img2img(diffusers_pipe, Image.fromarray(PICTURE), prompt="a watercolor",
                                 negative_prompt="blurry", sampler=sampler, steps=10, cfg=7.0, strength=strength,
                                 seed=21, batch_size=2)
    assert result.images.shape == (2, 64, 64, 3)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert f"Denoising strength: {strength:g}" in result.infotexts[0]


@pytest.mark.parametrize("mode", ["Just resize", "Crop and resize", "Resize and fill"])
def test_resize_modes(local_pipeline, diffusers_pipe, mode):
    wide = sample_picture(96, 64)
    request = Img2ImgRequest("x", width=64, height=64, resize_mode=mode, mask_blur=0)
    inputs = prepare_images(wide, None, request, vae_scale_factor=8)
    original = np.asarray(inputs.original)
    if mode == "Just resize":
        assert (original == np.asarray(Image.fromarray(wide).resize((64, 64), Image.Resampling.LANCZOS))).all()
    elif mode == "Crop and resize":  # scale to cover, keep the centre
        cover = Image.fromarray(wide).resize((96, 64), Image.Resampling.LANCZOS).crop((16, 0, 80, 64))
        assert (original == np.asarray(cover)).all()
    else:  # scaled to fit, the rest filled: the picture's middle rows are kept whole
        assert original.shape == (64, 64, 3) and not (original == np.asarray(
            Image.fromarray(wide).resize((64, 64), Image.Resampling.LANCZOS))).all()
    request = Img2ImgRequest(prompt="a cat", steps=6, seed=4, width=64, height=64, resize_mode=mode,
                             denoising_strength=0.5)
    result = local_pipeline.img2img(request, wide)
    expected = diffusers_img2img(diffusers_pipe, inputs.original, prompt="a cat", sampler="Euler a", steps=6, cfg=7.0,
                                 strength=0.5, seed=4)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF


def test_strength_zero_returns_the_vae_round_trip(local_pipeline, diffusers_pipe):
    result = local_pipeline.img2img(Img2ImgRequest(prompt="x", seed=8, width=64, height=64, denoising_strength=0.0),
                                    PICTURE)
    vae = diffusers_pipe.vae
    x = VaeImageProcessor(vae_scale_factor=8).preprocess(Image.fromarray(PICTURE))
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample(torch.Generator("cpu").manual_seed(8))
        decoded = vae.decode(latents).sample
    expected = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("strength,blur", [(0.8, 4), (1.0, 0)])
def test_inpainting_matches_diffusers_and_keeps_the_unmasked_pixels(local_pipeline, diffusers_pipe, strength, blur):
    request = Img2ImgRequest(prompt="a red door", sampler="Euler a", steps=10, guidance_scale=7.0, seed=13, width=64,
                             height=64, batch_size=2, denoising_strength=strength, mask_blur=blur)
    result = local_pipeline.img2img(request, PICTURE, MASK)
    mask = Image.fromarray(MASK)
    mask = VaeImageProcessor.blur(mask, blur) if blur else mask
    expected = diffusers_inpaint(diffusers_pipe, Image.fromarray(PICTURE), mask, prompt="a red door",
                                 sampler="Euler a", steps=10, cfg=7.0, strength=strength, seed=13, batch_size=2)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    untouched = np.asarray(mask) == 0
    assert (result.images[:, untouched] == PICTURE[untouched]).all()
    assert (result.images[:, np.asarray(mask) == 255] != PICTURE[np.asarray(mask) == 255]).any()
    assert f"Mask blur: {blur}" in result.infotexts[0]


def test_inpaint_only_masked_matches_diffusers_padding_mask_crop(local_pipeline, diffusers_pipe):
    request = Img2ImgRequest(prompt="a red door", steps=8, seed=5, width=64, height=64, denoising_strength=0.9,
                             mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=8)
    result = local_pipeline.img2img(request, PICTURE, MASK)
    expected = diffusers_inpaint(diffusers_pipe, Image.fromarray(PICTURE), Image.fromarray(MASK), prompt="a red door",
                                 sampler="Euler a", steps=8, cfg=7.0, strength=0.9, seed=5, padding=8)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert (result.images[0][MASK == 0] == PICTURE[MASK == 0]).all()
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.infotexts[0]


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_nine_channel_inpainting_unet_matches_diffusers(inpainting_pipeline, inpainting_model, strength):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(inpainting_model), local_files_only=True)
    assert pipe.unet.config.in_channels == 9
    request = Img2ImgRequest(prompt="a red door", steps=8, seed=31, width=64, height=64, batch_size=2,
                             denoising_strength=strength, mask_blur=2)
    result = inpainting_pipeline.img2img(request, PICTURE, MASK)
    mask = VaeImageProcessor.blur(Image.fromarray(MASK), 2)
    expected = diffusers_inpaint(pipe, Image.fromarray(PICTURE), mask, prompt="a red door", sampler="Euler a",
                                 steps=8, cfg=7.0, strength=strength, seed=31, batch_size=2)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF


def test_inpainting_model_explains_what_it_needs(inpainting_pipeline):
    with pytest.raises(InvalidRequest) as exc:
        inpainting_pipeline.txt2img(Txt2ImgRequest(prompt="x", width=64, height=64))
    assert "inpainting model" in str(exc.value) and "img2img" in str(exc.value)
    with pytest.raises(InvalidRequest) as exc:
        inpainting_pipeline.img2img(Img2ImgRequest(prompt="x", width=64, height=64), PICTURE)
    assert exc.value.field == "mask"


def test_bad_images_are_refused_by_name(local_pipeline):
    request = Img2ImgRequest(prompt="x", width=64, height=64)
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.img2img(request, PICTURE[..., 0])
    assert exc.value.field == "init_image" and "H x W x 3" in str(exc.value)
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.img2img(request, PICTURE, np.zeros((64, 64), dtype=np.uint8))
    assert exc.value.field == "mask" and "white where" in str(exc.value)
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.img2img(request, None)
    assert exc.value.field == "init_image"


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_matches_diffusers_first_pass_then_img2img(local_pipeline, diffusers_pipe, upscaler):
    request = Txt2ImgRequest(prompt="a castle", sampler="Euler a", steps=8, guidance_scale=7.0, seed=17, width=64,
                             height=64, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=6,
                             denoising_strength=0.6)
    result = local_pipeline.txt2img(request)
    assert result.images.shape == (1, 96, 96, 3)
    original = diffusers_pipe.scheduler
    try:
        diffusers_pipe.scheduler = reference_scheduler("Euler a", original.config, 17)
        first = diffusers_pipe("a castle", num_inference_steps=8, guidance_scale=7.0, width=64, height=64,
                               generator=torch.Generator("cpu").manual_seed(17),
                               output_type="latent" if upscaler == "Latent" else "pil").images
    finally:
        diffusers_pipe.scheduler = original
    if upscaler == "Latent":
        init = torch.nn.functional.interpolate(first, size=(12, 12), mode="bilinear", antialias=False)
    else:
        init = first[0].resize((96, 96), Image.Resampling.LANCZOS)
    expected = diffusers_img2img(diffusers_pipe, init, prompt="a castle", sampler="Euler a", steps=6, cfg=7.0,
                                 strength=0.6, seed=17)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert f"Hires upscale: 1.5, Hires steps: 6, Hires upscaler: {upscaler}" in result.infotexts[0]
    assert "Denoising strength: 0.6" in result.infotexts[0] and "Size: 64x64" in result.infotexts[0]


def test_hires_scale_beyond_the_model_is_refused(local_pipeline):
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", width=768, height=512, enable_hr=True, hr_scale=2.0))
    assert exc.value.field == "hr_scale" and "1024" in str(exc.value)


@pytest.mark.parametrize("settings, field, words", [
    (dict(width=256, height=512, hr_resize_x=1024), "hr_resize_x", "1024x2048"),  # its upscale is too large
    (dict(width=512, height=256, hr_resize_x=16, hr_resize_y=8), "hr_resize_x", "at least"),  # its crop too small
    (dict(width=64, height=64, hr_sampler="DDIM", hr_schedule_type="Align Your Steps"), "hr_schedule_type",
     "with sampler 'DDIM'"),
    (dict(width=64, height=64, hr_sampler="LCM", hr_second_pass_steps=60), "hr_second_pass_steps", "at most 50"),
])
def test_a_hires_size_or_sampler_the_model_cannot_take_is_refused_by_its_field(local_pipeline, settings, field,
                                                                              words):
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", enable_hr=True, **settings))
    assert exc.value.field == field and words in str(exc.value)


def test_plain_txt2img_unchanged_by_the_hires_fields(local_pipeline, diffusers_pipe):
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a castle", steps=6, seed=2, width=64, height=64,
                                                   hr_scale=3.0, denoising_strength=0.2))
    expected = diffusers_images(diffusers_pipe, prompt="a castle", sampler="Euler a", steps=6, cfg=7.0, seed=2,
                                width=64, height=64)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert "Hires" not in result.infotexts[0] and "Denoising" not in result.infotexts[0]
