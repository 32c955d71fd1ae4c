"""A1111's latent mask: ``latent_mask`` (a mask of its own for the latents' blending, taken as sent) and
``mask_round`` off (the latents blend by the blurred mask's own values), in-process, served and through the
gateway. The reference latent mask is A1111 1.10's StableDiffusionProcessingImg2Img.init written out with
Pillow: the mask as RGB resized to the latents' size with Pillow's default filter, its red channel / 255,
rounded when mask_round is on."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.request import Img2ImgRequest

PICTURE = (np.indices((64, 64)).sum(0)[..., None] * np.array([2, 1, 3]) % 256).astype(np.uint8)
MASK = np.zeros((64, 64), dtype=np.uint8)
MASK[10:50, 20:60] = 255
MASK[30:40, 5:20] = 128  # a grey part: what rounding decides
LATENT = np.zeros((64, 64), dtype=np.uint8)
LATENT[20:44, 28:52] = 255
SETTINGS = dict(prompt="a red door", steps=6, seed=4, width=64, height=64, denoising_strength=0.8, mask_blur=0,
                sampler="Euler a")


def a1111_latmask(mask: np.ndarray, rounded: bool) -> torch.Tensor:
    cells = np.asarray(Image.fromarray(mask).convert("RGB").resize((8, 8)), dtype=np.float32)[..., 0] / 255
    return torch.from_numpy(np.around(cells) if rounded else cells)[None, None]


def test_mask_round_off_blends_by_the_masks_own_values(local_pipeline):
    plan = local_pipeline.plan(Img2ImgRequest(**SETTINGS, mask_round=False), PICTURE, MASK)
    assert torch.equal(plan.images.blend, a1111_latmask(MASK, rounded=False))
    assert ((plan.images.blend > 0) & (plan.images.blend < 1)).any()  # a soft blend, not 0 or 1
    assert local_pipeline.plan(Img2ImgRequest(**SETTINGS), PICTURE, MASK).images.blend is None  # the default


def test_a_latent_mask_is_taken_as_sent(local_pipeline):
    for rounded in (True, False):
        plan = local_pipeline.plan(Img2ImgRequest(**SETTINGS, mask_round=rounded), PICTURE, MASK, LATENT)
        assert torch.equal(plan.images.blend, a1111_latmask(LATENT, rounded))
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.plan(Img2ImgRequest(**SETTINGS), PICTURE, None, LATENT)
    assert exc.value.field == "latent_mask"


def test_the_latent_mask_changes_what_is_redrawn(local_pipeline):
    """Inside the mask but outside the latent mask the latents stay the picture's: closer to it than when the
    mask alone blends (the pasted-back overlay still follows the mask)."""
    plain = local_pipeline.img2img(Img2ImgRequest(**SETTINGS), PICTURE, MASK).images[0].astype(float)
    kept = local_pipeline.img2img(Img2ImgRequest(**SETTINGS), PICTURE, MASK, latent_mask=LATENT).images[0]
    region = (MASK == 255) & (LATENT == 0)
    region[20:44, 24:56] = False  # (a margin around the latent mask, where the VAE mixes both)
    assert np.abs(kept.astype(float) - PICTURE)[region].mean() < np.abs(plain - PICTURE)[region].mean()
    soft = local_pipeline.img2img(Img2ImgRequest(**SETTINGS, mask_round=False), PICTURE, MASK).images[0]
    assert np.abs(soft.astype(float) - plain).max() > 2


def test_served_and_through_the_gateway_as_in_process(server, local_pipeline):
    client = Client(server.url)
    served = client.img2img(SETTINGS["prompt"], PICTURE, MASK, latent_mask=LATENT, mask_round=False,
                            **{k: v for k, v in SETTINGS.items() if k != "prompt"})
    local = local_pipeline.img2img(Img2ImgRequest(**SETTINGS, mask_round=False), PICTURE, MASK, latent_mask=LATENT)
    assert np.abs(served.images.astype(int) - local.images).max() <= 1

    def b64(array: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    api = TestClient(create_app(client))
    body = {"prompt": SETTINGS["prompt"], "steps": 6, "seed": 4, "width": 64, "height": 64, "denoising_strength": 0.8,
            "mask_blur": 0, "sampler_name": "Euler a", "init_images": [b64(PICTURE)], "mask": b64(MASK),
            "latent_mask": b64(LATENT), "mask_round": False, "inpainting_fill": 1, "inpaint_full_res": False}
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text[:500]
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
    direct = client.img2img(SETTINGS["prompt"], PICTURE, MASK, latent_mask=LATENT, mask_round=False,
                            k_diffusion=True, **{k: v for k, v in SETTINGS.items() if k != "prompt"})
    assert (picture == direct.images[0]).all()
