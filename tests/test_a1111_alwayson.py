"""A1111's always-on scripts through the gateway (``alwayson_scripts`` as A1111's API takes them: its
api.init_script_args and the built-in scripts' published code), against a real Triton server: what each one's
arguments change (and what A1111's API leaves to the request's own fields), A1111's refusals, and the prompt
comments its Comments script strips from every request."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reference import sample_mask, sample_picture
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.requests.infotext import parse_infotext

BASE = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7, "seed": 11,
        "prompt": "a lighthouse at dusk"}


@pytest.fixture(scope="module")
def api(server):
    return TestClient(create_app(Client(server.url)))


def picture(response) -> np.ndarray:
    assert response.status_code == 200, response.text[:2000]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))))


def refusal(response) -> tuple[list, str]:
    assert response.status_code == 422, response.text[:2000]
    detail = response.json()["detail"][0]
    return detail["loc"], detail["msg"]


def b64png(array: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def strip_as_a1111(text: str) -> str:
    """modules/processing_scripts/comments.py's strip_comments, written out from its published code."""
    text = re.sub("(^|\n)#[^\n]*(\n|$)", "\n", text)
    return re.sub("#[^\n]*(\n|$)", "\n", text)


def test_the_ui_only_scripts_arguments_change_nothing_and_are_named_as_ignored(api):
    """A1111's API skips the setup of Refiner, Seed and Sampler (setup_for_ui_only): their arguments, even a
    different seed or sampler, leave the picture the request's fields give."""
    plain = api.post("/sdapi/v1/txt2img", json=BASE)
    scripts = {"Seed": {"args": [999, True, 5, 0.7, 0, 0]}, "sampler": {"args": [30, "DPM++ 2M", "Karras"]},
               "REFINER": {"args": [True, "", 0.5]}, "comments": {}, "Extra options": {"args": []},
               "hypertile": {"args": [1, 2, 3]}}
    named = api.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": scripts})
    assert np.array_equal(picture(named), picture(plain))
    assert json.loads(named.json()["info"])["infotexts"] == json.loads(plain.json()["info"])["infotexts"]
    ignored = named.headers["X-Sdtrt-Ignored-Fields"].split(",")
    assert {"alwayson_scripts.Seed", "alwayson_scripts.sampler", "alwayson_scripts.REFINER"} <= set(ignored)
    assert not any(name in ignored for name in ("alwayson_scripts.comments", "alwayson_scripts.hypertile"))


@pytest.mark.parametrize("scripts,words", [
    ({"Prompts from file": {"args": []}}, ["not found", "Refiner", "Seed"]),
    ({"soft inpainting": {"args": []}}, ["not found"]),  # an img2img script, named in txt2img
    ({"x/y/z plot": {"args": []}}, ["selectable", "script_name"]),
    ({"controlnet": {"args": [{"enabled": True, "model": "control_v11p_sd15_canny"}]}}, ["ControlNets", "--controlnets"]),
    ({"seed": {"args": 5}}, ['"args"']),
    ({"seed": [1, 2]}, ['"args"']),
])
def test_a1111s_refusals_name_the_scripts_sdtrt_has(api, scripts, words):
    loc, message = refusal(api.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": scripts}))
    assert loc[0] == "body" and loc[1].startswith("alwayson_scripts")
    assert all(word in message for word in words), message
    assert api.post("/sdapi/v1/txt2img", json=BASE).status_code == 200  # and it serves on


def test_comments_are_stripped_from_the_prompts_as_a1111_does_unless_the_option_is_off(api):
    commented = "a lighthouse # at dawn\n# a whole line of notes\nat dusk"
    negative = "blurry #, sharp"
    stripped = api.post("/sdapi/v1/txt2img", json={**BASE, "prompt": commented, "negative_prompt": negative})
    plain = api.post("/sdapi/v1/txt2img", json={**BASE, "prompt": strip_as_a1111(commented),
                                                "negative_prompt": strip_as_a1111(negative)})
    assert strip_as_a1111(commented) == "a lighthouse \nat dusk"
    assert np.array_equal(picture(stripped), picture(plain))
    prompt, negative_kept, _ = parse_infotext(json.loads(stripped.json()["info"])["infotexts"][0])
    assert "#" not in prompt and "#" not in negative_kept
    kept = api.post("/sdapi/v1/txt2img", json={**BASE, "prompt": commented,
                                               "override_settings": {"enable_prompt_comments": False}})
    assert "# at dawn" in json.loads(kept.json()["info"])["infotexts"][0]
    assert not np.array_equal(picture(kept), picture(stripped))
    hires = {**BASE, "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_upscaler": "Latent"}
    with_hr = api.post("/sdapi/v1/txt2img", json={**hires, "hr_prompt": "a tower # at noon"})
    without = api.post("/sdapi/v1/txt2img", json={**hires, "hr_prompt": "a tower "})
    assert np.array_equal(picture(with_hr), picture(without))


def test_soft_inpainting_switched_off_is_a_plain_inpaint_and_its_arguments_are_checked(api):
    inpaint = {**BASE, "init_images": [b64png(sample_picture(64, 64))], "mask": b64png(sample_mask(64, 64)),
               "denoising_strength": 0.75, "mask_blur": 4}
    plain = api.post("/sdapi/v1/img2img", json=inpaint)
    off = api.post("/sdapi/v1/img2img", json={**inpaint, "alwayson_scripts": {"Soft Inpainting": {"args": [False]}}})
    assert np.array_equal(picture(off), picture(plain))
    loc, message = refusal(api.post("/sdapi/v1/img2img", json={
        **inpaint, "alwayson_scripts": {"soft inpainting": {"args": [True, 1, 0.5, 40]}}}))
    assert "Transition contrast boost" in message and "1 to 32" in message and "40" in message


def test_hypertile_on_a_model_without_its_networks_is_refused_by_name_not_ignored(api):
    loc, message = refusal(api.post("/sdapi/v1/txt2img", json={
        **BASE, "override_settings": {"hypertile_enable_unet": True}}))
    assert loc[-1] == "override_settings.hypertile_enable_unet" and "--hypertile" in message


def test_interrogate_answers_a1111s_route_with_a_refusal_naming_the_model(api):
    loc, message = refusal(api.post("/sdapi/v1/interrogate", json={"image": b64png(sample_picture(64, 64)),
                                                                    "model": "deepdanbooru"}))
    assert loc[-1] == "model" and "'deepdanbooru'" in message and "interrogator" in message
