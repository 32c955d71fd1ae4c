"""A1111's img2img beyond the basics: what fills the masked area before sampling ("Masked content"), several
init images in one request, and what A1111 does with image_cfg_scale.

References: diffusers' inpainting pipeline, handed the init A1111 would build (its masking.fill restated below
from A1111's published code for "fill"; the image latents with the masked area replaced for "latent noise" and
"latent nothing", which diffusers' pipeline accepts in place of a picture).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

import diffusers as d
from diffusers.image_processor import VaeImageProcessor

from reference import MAX_PIXEL_DIFF, diffusers_img2img, diffusers_inpaint, max_diff, sample_mask, sample_picture
from sdtrt.client import Client
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.request import Img2ImgRequest

PICTURE = sample_picture(64, 64)
MASK = sample_mask(64, 64)
SETTINGS = dict(prompt="a red door", sampler="Euler", steps=8, guidance_scale=7.0, seed=21, width=64, height=64,
                denoising_strength=0.8, mask_blur=0)


def a1111_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's modules/masking.py fill: the unmasked colours, blurred ever less, composited over the hole."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def test_fill_inpaints_from_a1111s_filled_picture(local_pipeline, diffusers_pipe):
    result = local_pipeline.img2img(Img2ImgRequest(inpainting_fill="fill", **SETTINGS), PICTURE, MASK)
    filled = a1111_fill(Image.fromarray(PICTURE), Image.fromarray(MASK))
    expected = diffusers_inpaint(diffusers_pipe, filled, Image.fromarray(MASK), prompt="a red door", sampler="Euler",
                                 steps=8, cfg=7.0, strength=0.8, seed=21)
    # outside the mask A1111 pastes back the original, not the filled picture
    keep = MASK == 0
    assert (result.images[0][keep] == PICTURE[keep]).all()
    assert max_diff(result.images[:, ~keep], expected[:, ~keep]) <= MAX_PIXEL_DIFF
    original = local_pipeline.img2img(Img2ImgRequest(**SETTINGS), PICTURE, MASK)
    assert (original.images != result.images).any()
    assert "Masked content: fill" in result.infotexts[0]
    assert "Masked content" not in original.infotexts[0]  # A1111 writes it only when it is not "original"


def _latents_fill_reference(pipe, fill: str, seed: int) -> np.ndarray:
    """diffusers' inpainting pipeline from image latents whose masked area A1111 replaced: the image's latents
    sampled with the image's generator (as the pipeline would), then the noise the pipeline draws next (a copy
    of the generator's state) or zeros in the masked latent cells."""
    processor = VaeImageProcessor(vae_scale_factor=8)
    mask_processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    image = processor.preprocess(Image.fromarray(PICTURE), 64, 64)
    with torch.no_grad():
        latents = pipe.vae.encode(image).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    mask = mask_processor.preprocess(Image.fromarray(MASK), 64, 64)
    cells = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]).round()
    ahead = torch.Generator("cpu")
    ahead.set_state(generator.get_state())
    replacement = torch.randn(latents.shape, generator=ahead) if fill == "latent noise" else torch.zeros_like(latents)
    start = latents * (1 - cells) + replacement * cells
    inpaint = d.StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    inpaint.scheduler = d.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    # masked_image_latents only feeds 9-channel U-Nets; given, the pipeline does not try to mask the latents as pixels
    out = inpaint("a red door", image=start, mask_image=Image.fromarray(MASK), masked_image_latents=start * 0,
                  strength=0.8, num_inference_steps=8,
                  guidance_scale=7.0, width=64, height=64, generator=generator, output_type="pil").images[0]
    return np.asarray(inpaint.image_processor.apply_overlay(Image.fromarray(MASK), Image.fromarray(PICTURE), out))


@pytest.mark.parametrize("fill", ["latent noise", "latent nothing"])
def test_latent_fills_start_from_a1111s_init_latents(fill, local_pipeline, diffusers_pipe):
    result = local_pipeline.img2img(Img2ImgRequest(inpainting_fill=fill, **SETTINGS), PICTURE, MASK)
    expected = _latents_fill_reference(diffusers_pipe, fill, 21)
    assert max_diff(result.images[0], expected) <= MAX_PIXEL_DIFF
    original = local_pipeline.img2img(Img2ImgRequest(**SETTINGS), PICTURE, MASK)
    assert (original.images != result.images).any()
    assert f"Masked content: {fill}" in result.infotexts[0]


def test_fill_mode_without_a_mask_changes_nothing(local_pipeline):
    """As A1111: the masked content only matters where there is a mask."""
    plain = local_pipeline.img2img(Img2ImgRequest(**SETTINGS), PICTURE)
    filled = local_pipeline.img2img(Img2ImgRequest(inpainting_fill="latent nothing", **SETTINGS), PICTURE)
    assert (plain.images == filled.images).all() and "Masked content" not in filled.infotexts[0]


def test_fill_modes_served_match_the_local_runner(server, local_pipeline):
    for fill in ("fill", "latent noise"):
        served = Client(server.url).img2img(SETTINGS["prompt"], PICTURE, MASK, inpainting_fill=fill,
                                            **{k: v for k, v in SETTINGS.items() if k != "prompt"})
        local = local_pipeline.img2img(Img2ImgRequest(inpainting_fill=fill, **SETTINGS), PICTURE, MASK)
        assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
        assert served.infotexts == local.infotexts


def test_several_init_images_give_one_picture_each(server, diffusers_pipe):
    """A1111: k init images make a batch of k (k at most batch_size), image i redrawn from init i with seed + i."""
    other = np.ascontiguousarray(PICTURE[::-1])
    settings = {k: v for k, v in SETTINGS.items() if k not in ("prompt", "mask_blur")}
    result = Client(server.url).img2img("a red door", [PICTURE, other], **{**settings, "batch_size": 4}, n_iter=2)
    assert result.seeds == [21, 22, 23, 24] and result.images.shape[0] == 4
    for i, (picture, seed) in enumerate([(PICTURE, 21), (other, 22), (PICTURE, 23), (other, 24)]):
        expected = diffusers_img2img(diffusers_pipe, Image.fromarray(picture), prompt="a red door", sampler="Euler",
                                     steps=8, cfg=7.0, strength=0.8, seed=seed)
        assert max_diff(result.images[i:i + 1], expected) <= MAX_PIXEL_DIFF


def test_more_init_images_than_the_batch_is_refused(server):
    with pytest.raises(InvalidRequest) as exc:
        Client(server.url).img2img("x", [PICTURE, PICTURE, PICTURE], batch_size=2, steps=2, width=64, height=64)
    assert exc.value.field == "init_image" and "at most 2" in str(exc.value)


def test_an_instruct_pix2pix_model_is_refused_at_export(default_model, tmp_path):
    """A1111 uses image_cfg_scale only with instruct-pix2pix (edit) models and ignores it for the others, as the
    gateway does (tests/test_web.py); an edit model itself is refused by name rather than served wrongly."""
    from sdtrt.contract.errors import UsageError
    from sdtrt.export import export_model

    pipe = d.StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, safety_checker=None)
    old = pipe.unet.conv_in
    pipe.unet.conv_in = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, padding=old.padding)
    pipe.unet.register_to_config(in_channels=8)
    pipe.save_pretrained(tmp_path / "edit")
    with pytest.raises(UsageError, match="instruct-pix2pix \\(edit\\) model \\(8-channel U-Net\\)"):
        export_model(tmp_path / "edit", tmp_path / "repo", progress=False, report=lambda *_: None)
