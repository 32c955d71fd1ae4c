"""A1111's firstpass_image: the hires fix starts from a given picture instead of drawing its first pass (A1111
1.8+'s txt2img). With an upscaler that works on pixels, a first pass's own picture given back must give exactly
the hires fix's picture (the hires pass decodes its first pass to the same uint8 picture before upscaling it);
with a latent upscaler the picture is encoded by the request's model first."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.request import Txt2ImgRequest

FIRST = dict(prompt="a castle on a hill", steps=5, seed=21, width=64, height=64, sampler="Euler a")
HIRES = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=4)


def test_a_first_pass_given_back_gives_the_hires_fix_picture(local_pipeline):
    first = local_pipeline.txt2img(Txt2ImgRequest(**FIRST)).images[0]
    whole = local_pipeline.txt2img(Txt2ImgRequest(**FIRST, **HIRES, hr_upscaler="Lanczos"))
    given = local_pipeline.txt2img(Txt2ImgRequest(**FIRST, **HIRES, hr_upscaler="Lanczos"), firstpass_image=first)
    assert given.images.shape == (1, 96, 96, 3) and (given.images == whole.images).all()
    other = np.full_like(first, 128)
    assert (local_pipeline.txt2img(Txt2ImgRequest(**FIRST, **HIRES, hr_upscaler="Lanczos"),
                                   firstpass_image=other).images != whole.images).any()


def test_with_a_latent_upscaler_the_picture_is_encoded_first(local_pipeline):
    first = local_pipeline.txt2img(Txt2ImgRequest(**FIRST)).images[0]
    result = local_pipeline.txt2img(Txt2ImgRequest(**FIRST, **HIRES, batch_size=2), firstpass_image=first)
    assert result.images.shape == (2, 96, 96, 3) and result.images.std() > 1.0
    grey = local_pipeline.txt2img(Txt2ImgRequest(**FIRST, **HIRES, batch_size=2),
                                  firstpass_image=np.full_like(first, 128))
    assert np.abs(grey.images.astype(int) - result.images).max() > 10  # it starts from the picture given


@pytest.mark.parametrize("settings,picture,message", [
    (FIRST, np.zeros((64, 64, 3), np.uint8), "sent with enable_hr"),
    ({**FIRST, **HIRES}, np.zeros((80, 64, 3), np.uint8), "a 64x64 RGB uint8 picture"),
])
def test_a_first_pass_picture_that_does_not_fit_is_refused_by_name(local_pipeline, settings, picture, message):
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(**settings), firstpass_image=picture)
    assert exc.value.field == "firstpass_image" and message in str(exc.value)


def test_served_and_through_the_gateway(server, local_pipeline):
    client = Client(server.url)
    first = local_pipeline.txt2img(Txt2ImgRequest(**FIRST)).images[0]
    settings = {k: v for k, v in {**FIRST, **HIRES}.items() if k != "prompt"}
    served = client.txt2img(FIRST["prompt"], firstpass_image=first, hr_upscaler="Lanczos", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(**FIRST, **HIRES, hr_upscaler="Lanczos"), firstpass_image=first)
    assert np.abs(served.images.astype(int) - local.images).max() <= 1

    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, format="PNG")
    api = TestClient(create_app(client))
    body = {"prompt": FIRST["prompt"], "steps": 5, "seed": 21, "width": 64, "height": 64, "sampler_name": "Euler a",
            "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_second_pass_steps": 4,
            "hr_upscaler": "Lanczos", "firstpass_image": base64.b64encode(buffer.getvalue()).decode()}
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text[:500]
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
    direct = client.txt2img(FIRST["prompt"], firstpass_image=first, hr_upscaler="Lanczos", k_diffusion=True,
                            **settings)
    assert (picture == direct.images[0]).all()
    without_hires = api.post("/sdapi/v1/txt2img", json={**body, "enable_hr": False})
    assert without_hires.status_code == 200  # A1111 reads it only with the hires fix
