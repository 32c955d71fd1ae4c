"""A1111's Soft Inpainting (extensions-builtin/soft-inpainting/scripts/soft_inpainting.py, A1111 1.10) in-process,
served and through the gateway's ``alwayson_scripts``.

The reference is A1111's code path written out here from its published code, on diffusers' networks and
k-diffusion's sample_euler, independent of sdtrt's code: the latent mask (the mask as RGB resized to the latents
with Pillow's default filter, red / 255, not rounded: the script turns rounding off), A1111's CFGDenoiser with
its mask blend replaced by the script's latent_blend at nmask ** (sigma ** bias * strength), no blend after
sampling, then apply_adaptive_masks (its weighted_histogram_filter as its per-pixel loop, get_gaussian_kernel,
smootherstep, resize, GaussianBlur 4) and the overlay pasted as A1111's apply_overlay."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageFilter, ImageOps

from reference import MAX_PIXEL_DIFF, A1111Schedules, k_sampling, max_diff, sample_mask, sample_picture
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.errors import InvalidRequest
from sdtrt.pipeline.soft_inpainting import gaussian_kernel, histogram_filter
from sdtrt.requests.request import Img2ImgRequest

PROMPT, NEGATIVE, SEED, STEPS, STRENGTH, CFG = "a red door in a wall", "blurry", 7, 8, 0.75, 7.0
PICTURE, MASK = sample_picture(64, 64), sample_mask(64, 64)
SETTINGS = (1.0, 0.5, 4.0, 0.0, 0.5, 2.0)  # A1111's defaults: bias, strength, boost, influence, threshold, contrast
OTHER = (2.0, 1.5, 8.0, 0.5, 0.25, 4.0)
NAMES = ("schedule_bias", "preservation_strength", "transition_contrast_boost", "mask_influence",
         "difference_threshold", "difference_contrast")


def a1111_kernel(stddev: float = 1.5, radius: int = 2) -> np.ndarray:
    gaussian = lambda sq: math.exp(-sq / (stddev * stddev))  # noqa: E731
    zero = gaussian((radius + 1.0) ** 2)
    kernel = np.zeros((2 * radius + 1, 2 * radius + 1))
    for index in np.ndindex(kernel.shape):
        y, x = np.array(index) - radius
        kernel[index] = max(0.0, (gaussian(y ** 2.0 + x ** 2.0) - zero) / (1 - zero))
    return kernel


def a1111_histogram_filter(img, kernel, low, high, min_width=1.0):
    """weighted_histogram_filter as A1111's per-pixel loop runs it."""
    center = np.array([kernel.shape[0] // 2] * 2)
    out = img.copy()
    for index in np.ndindex(img.shape):
        idx = np.array(index)
        lo, hi = np.maximum(0, idx - center), np.minimum(np.array(img.shape), idx + np.array(kernel.shape) - center)
        values = []
        for window in np.ndindex(tuple(hi - lo)):
            image_index = np.array(window) + lo
            values.append([img[tuple(image_index)], kernel[tuple(image_index - idx + center)], 0.0, 0.0])
        values.sort(key=lambda v: v[0])
        total = 0
        for v in values:
            v[2] = total
            total += v[1]
            v[3] = total
        wmin, wmax = total * low, total * high
        if wmax - wmin < min_width:
            c = (wmin + wmax) / 2
            wmin, wmax = c - min_width / 2, c + min_width / 2
            if wmax > total:
                wmax, wmin = total, total - min_width
            if wmin < 0:
                wmin, wmax = 0, min_width
        value = weight = 0
        for v in values:
            if wmin >= v[3]:
                continue
            if wmax <= v[2]:
                break
            w = min(wmax, v[3]) - max(wmin, v[2])
            value += v[0] * w
            weight += w
        out[index] = value / weight if weight != 0 else 0
    return out


def test_the_filters_are_a1111s_per_pixel_loop():
    assert np.allclose(gaussian_kernel(1.5, 2), a1111_kernel(), rtol=0, atol=1e-15)
    rng = np.random.default_rng(3)
    for shape in ((8, 8), (5, 9), (1, 4)):
        image = rng.random(shape, dtype=np.float32) * 3
        image[0, 0] = image[-1, -1]  # a tie
        for low, high in ((0.9, 1.0), (0.25, 0.75), (0.0, 0.0), (0.5, 0.5)):
            ours = histogram_filter(image, a1111_kernel(), low, high)
            assert ours.dtype == np.float32
            assert np.allclose(ours, a1111_histogram_filter(image, a1111_kernel(), low, high), rtol=1e-6, atol=1e-7)


def a1111_latent_blend(a, b, t, detail):
    """latent_blend as A1111 writes it, t of shape [4, h, w] (A1111's nmask)."""
    t2, t3 = t.unsqueeze(0), t[0].unsqueeze(0).unsqueeze(0)
    interp = a * (1 - t2) + b * t2
    current = torch.norm(interp, p=2, dim=1, keepdim=True).to(torch.float64) + 0.00001
    desired = (torch.norm(a, p=2, dim=1, keepdim=True).to(torch.float64) ** detail * (1 - t3)
               + torch.norm(b, p=2, dim=1, keepdim=True).to(torch.float64) ** detail * t3) ** (1 / detail)
    return interp * (desired / current).to(interp.dtype)


@torch.no_grad()
def a1111_soft_picture(pipe, settings) -> np.ndarray:
    bias, strength, boost, influence, threshold, contrast = settings
    sampling, a1111 = k_sampling(), A1111Schedules(pipe.scheduler.config)
    sigmas = a1111.sigmas("Uniform", STEPS).float()  # Euler's Automatic schedule
    sigmas = sigmas[STEPS - int(min(STRENGTH, 0.999) * STEPS) - 1:]
    generator = torch.Generator().manual_seed(SEED)
    picture = torch.from_numpy(PICTURE).permute(2, 0, 1)[None].float() / 127.5 - 1
    init = pipe.vae.encode(picture).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
    x = init + torch.randn((1, 4, 8, 8), generator=generator) * sigmas[0]
    latmask = np.asarray(Image.fromarray(MASK).convert("RGB").resize((8, 8)), dtype=np.float32)[..., 0] / 255
    nmask = torch.from_numpy(np.tile(latmask[None], (4, 1, 1)))
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)

    def model(x, sigma, **_):
        x_in, s_in = torch.cat([x] * 2), torch.cat([sigma] * 2)
        t = torch.stack([a1111.sigma_to_t(float(s)).reshape(()) for s in s_in]).float()
        c_in = (1 / (s_in ** 2 + 1) ** 0.5).reshape(-1, 1, 1, 1)
        eps = pipe.unet(x_in * c_in, t, encoder_hidden_states=torch.cat([cond, uncond])).sample
        c, u = (x_in - eps * s_in.reshape(-1, 1, 1, 1)).chunk(2)
        denoised = u + (c - u) * CFG
        return a1111_latent_blend(init, denoised, torch.pow(nmask, (sigma[0] ** bias) * strength), boost)

    samples = sampling.sample_euler(model, x, sigmas=sigmas, disable=True)
    decoded = pipe.vae.decode(samples / pipe.vae.config.scaling_factor).sample
    image = Image.fromarray((pipe.image_processor.postprocess(decoded, output_type="np")[0] * 255).round()
                            .astype(np.uint8))
    # apply_adaptive_masks
    scalar = 1 - torch.clamp(nmask[0].float(), min=0, max=1) ** (strength / 2)
    scalar = 0.5 * (1 - influence) + scalar * influence
    scalar = (scalar / (1.00001 - scalar)).numpy()
    distance = torch.norm(samples - init, p=2, dim=1)[0].float().numpy()
    kernel = a1111_kernel()
    mask = a1111_histogram_filter(distance, kernel, 0.9, 1)
    mask = a1111_histogram_filter(mask, kernel, 0.25, 0.75) / (threshold * scalar)
    mask = 1 / (1 + mask ** contrast)
    mask = 1 - mask * mask * mask * (mask * (6 * mask - 15) + 10)
    mask = Image.fromarray((255. * mask).astype(np.uint8)).resize((64, 64), Image.LANCZOS)
    mask = mask.convert("RGB").convert("L").filter(ImageFilter.GaussianBlur(radius=4))
    overlay = Image.new("RGBa", (64, 64))
    overlay.paste(Image.fromarray(PICTURE).convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    out = image.convert("RGBA")
    out.alpha_composite(overlay.convert("RGBA"))
    return np.asarray(out.convert("RGB"))[None]


def soft_request(settings=SETTINGS, **changes) -> Img2ImgRequest:
    fields = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": STEPS, "width": 64, "height": 64,
              "sampler": "Euler", "k_diffusion": True, "denoising_strength": STRENGTH, "guidance_scale": CFG,
              "mask_blur": 0, "soft_inpainting": True, **{f"soft_inpainting_{n}": v for n, v in zip(NAMES, settings)}}
    return Img2ImgRequest(**{**fields, **changes})


@pytest.fixture(scope="module")
def expected(diffusers_pipe):
    return {settings: a1111_soft_picture(diffusers_pipe, settings) for settings in (SETTINGS, OTHER)}


@pytest.mark.parametrize("settings", [SETTINGS, OTHER])
def test_soft_inpainting_gives_a1111s_picture_in_process(settings, local_pipeline, expected):
    result = local_pipeline.img2img(soft_request(settings), PICTURE, MASK)
    assert max_diff(result.images, expected[settings]) <= MAX_PIXEL_DIFF
    plain = local_pipeline.img2img(soft_request(settings, soft_inpainting=False), PICTURE, MASK)
    assert max_diff(plain.images, expected[settings]) > MAX_PIXEL_DIFF  # the reference tells them apart
    text = result.infotexts[0]
    assert "Soft inpainting enabled: True" in text
    assert f"Soft inpainting transition contrast boost: {settings[2]:g}" in text
    assert "Soft inpainting" not in plain.infotexts[0]


def b64png(array: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_soft_inpainting_through_the_gateways_alwayson_scripts_and_served(server, expected):
    api = TestClient(create_app(Client(server.url)))
    payload = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": STEPS, "width": 64,
               "height": 64, "sampler_name": "Euler", "denoising_strength": STRENGTH, "cfg_scale": CFG,
               "mask_blur": 0, "inpaint_full_res": False, "inpainting_fill": 1, "init_images": [b64png(PICTURE)], "mask": b64png(MASK),
               "alwayson_scripts": {"Soft Inpainting": {"args": [True, *OTHER]}}}
    response = api.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == 200, response.text[:2000]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
    assert max_diff(image[None], expected[OTHER]) <= MAX_PIXEL_DIFF
    served = Client(server.url).img2img(PROMPT, PICTURE, MASK, **{
        k: v for k, v in soft_request(SETTINGS).as_dict().items() if k != "prompt" and v is not None})
    assert max_diff(served.images, expected[SETTINGS]) <= MAX_PIXEL_DIFF


def test_soft_inpainting_needs_a1111s_sampler_path_and_does_nothing_without_a_mask(local_pipeline):
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.img2img(soft_request(k_diffusion=False), PICTURE, MASK)
    assert exc.value.field == "soft_inpainting"
    without = local_pipeline.img2img(soft_request(), PICTURE)
    plain = local_pipeline.img2img(soft_request(soft_inpainting=False), PICTURE)
    assert np.array_equal(without.images, plain.images) and without.infotexts == plain.infotexts


def test_soft_inpainting_on_a1111s_timestep_samplers_and_only_masked(local_pipeline):
    """DDIM blends by the timestep (A1111's CompVis samplers hand the denoiser t as sigma); "Only masked" pastes
    each soft mask back into the crop's place, the original kept outside it."""
    ddim = local_pipeline.img2img(soft_request(sampler="DDIM"), PICTURE, MASK)
    assert "Soft inpainting enabled: True" in ddim.infotexts[0]
    assert not np.array_equal(ddim.images, local_pipeline.img2img(soft_request(sampler="DDIM", soft_inpainting=False),
                                                                  PICTURE, MASK).images)
    request = soft_request(inpaint_full_res=True, inpaint_full_res_padding=4)
    cropped = local_pipeline.img2img(request, PICTURE, MASK)
    x, y, x2, y2 = local_pipeline.plan(request, PICTURE, MASK).images.crop
    assert (x2 - x) * (y2 - y) < 64 * 64
    outside = np.ones(MASK.shape, dtype=bool)
    outside[y:y2, x:x2] = False
    assert np.array_equal(cropped.images[0][outside], PICTURE[outside])
    assert not np.array_equal(cropped.images[0], PICTURE)
