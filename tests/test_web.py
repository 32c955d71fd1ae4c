"""The AUTOMATIC1111-compatible gateway and the Gradio page, against a real server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reference import sample_mask, sample_picture
from servers import CHROMIUM, first_answer, free_ports, output_of, page_generates
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.requests.infotext import parse_infotext

@pytest.fixture(scope="module")
def api(server, tmp_path_factory):
    return TestClient(create_app(Client(server.url), tmp_path_factory.mktemp("api-outputs")))


def b64png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_txt2img_request_as_a1111_scripts_send_it(api, server):
    # Field names and shapes as in A1111's API examples (sdapi/v1/txt2img).
    payload = {"prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 42, "sampler_name": "DPM++ 2M",
               "scheduler": "Karras", "batch_size": 2, "n_iter": 1, "steps": 6, "cfg_scale": 7.5, "width": 64,
               "height": 64, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    response = api.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 2
    direct = Client(server.url).txt2img("a red fox in snow", negative_prompt="blurry", seed=42, sampler="DPM++ 2M",
                                        schedule_type="Karras", batch_size=2, steps=6, guidance_scale=7.5, width=64,
                                        height=64, clip_skip=2, k_diffusion=True)  # A1111's code path, as the gateway
    for data, expected, infotext in zip(body["images"], direct.images, direct.infotexts):
        picture = decode(data)
        assert (np.asarray(picture) == expected).all()
        assert picture.info["parameters"] == infotext
    info = json.loads(body["info"])
    assert info["all_seeds"] == [42, 43] and info["seed"] == 42 and info["clip_skip"] == 2
    assert info["infotexts"] == direct.infotexts and info["sd_model_hash"] == direct.infotexts[0].split(
        "Model hash: ")[1][:10]
    assert body["parameters"]["prompt"] == "a red fox in snow" and body["parameters"]["steps"] == 6


def test_minimal_request_and_legacy_sampler_fields(api):
    # A1111's own README example is {"prompt": ..., "steps": 5}; its API defaults (512x512, sampler_index "Euler").
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "puppy dog", "steps": 2, "width": 64, "height": 64,
                                                   "sampler_index": "k_euler_a", "seed": 3})
    assert response.status_code == 200, response.text
    _, _, params = parse_infotext(decode(response.json()["images"][0]).info["parameters"])
    assert params["Sampler"] == "Euler a" and params["Steps"] == "2" and params["Seed"] == "3"


def test_img2img_and_inpainting_as_a1111_scripts_send_them(api, server):
    picture, mask = sample_picture(64, 64), sample_mask(64, 64)
    payload = {"init_images": [b64png(picture)], "mask": b64png(mask), "prompt": "a red door",
               "denoising_strength": 0.8, "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": True,
               "inpaint_full_res_padding": 16, "resize_mode": 0, "steps": 5, "seed": 9, "width": 64, "height": 64}
    response = api.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == 200, response.text
    direct = Client(server.url).img2img("a red door", picture, mask, denoising_strength=0.8, mask_blur=2,
                                        inpaint_full_res=True, inpaint_full_res_padding=16, steps=5, seed=9,
                                        width=64, height=64, sampler="Euler", k_diffusion=True)
    assert (np.asarray(decode(response.json()["images"][0])) == direct.images[0]).all()
    assert "init_images" not in response.json()["parameters"]


def test_a_transparent_init_picture_is_flattened_on_the_background_option_as_a1111(api, server):
    """A1111's images.flatten: an RGBA init picture's transparency filled with img2img_background_color."""
    rgba = np.dstack([sample_picture(64, 64), np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))])
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    payload = {"init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "a red door", "steps": 3,
               "seed": 9, "width": 64, "height": 64, "denoising_strength": 0.5}
    for color in ("#ffffff", "#204080"):
        assert api.post("/sdapi/v1/options", json={"img2img_background_color": color}).status_code == 200
        response = api.post("/sdapi/v1/img2img", json=payload)
        assert response.status_code == 200, response.text
        flat = Image.new("RGBA", (64, 64), color)
        flat.paste(Image.fromarray(rgba, "RGBA"), mask=Image.fromarray(rgba, "RGBA"))
        direct = Client(server.url).img2img("a red door", np.asarray(flat.convert("RGB")), denoising_strength=0.5,
                                            steps=3, seed=9, width=64, height=64, sampler="Euler", k_diffusion=True)
        assert (np.asarray(decode(response.json()["images"][0])) == direct.images[0]).all(), color
    assert api.post("/sdapi/v1/options", json={"img2img_background_color": "#ffffff"}).status_code == 200


@pytest.mark.parametrize("field,value", [("restore_faces", True), ("tiling", True), ("script_name", "xyz plot"),
                                         ("hr_checkpoint_name", "another.safetensors")])
def test_fields_sdtrt_cannot_honour_are_refused_by_name(api, field, value):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Euler a", field: value})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]


def test_a_refiner_or_hires_checkpoint_that_is_the_requests_own_model_is_no_switch(api):
    """A1111 does not switch to a refiner or hires checkpoint it already runs on: the same picture as without."""
    model = api.get("/sdapi/v1/sd-models").json()[0]["title"]
    common = {"prompt": "a red barn", "steps": 3, "width": 64, "height": 64, "seed": 4, "enable_hr": True,
              "hr_scale": 1.5, "denoising_strength": 0.5, "sampler_name": "Euler a"}
    plain = api.post("/sdapi/v1/txt2img", json=common)
    same = api.post("/sdapi/v1/txt2img", json={**common, "hr_checkpoint_name": model, "refiner_checkpoint": model,
                                              "refiner_switch_at": 0.5})
    assert plain.status_code == same.status_code == 200, same.text[:500]
    assert plain.json()["images"] == same.json()["images"]
    info = json.loads(same.json()["info"])["infotexts"][0]
    assert "Refiner" not in info and "Hires checkpoint" not in info  # no switch planned
    other = api.post("/sdapi/v1/txt2img", json={**common, "refiner_checkpoint": "sd_xl_refiner_1.0.safetensors"})
    assert other.status_code == 422 and other.json()["detail"][0]["loc"] == ["body", "refiner_checkpoint"]
    assert "not one of this server's models" in other.text


def test_values_that_change_nothing_are_accepted_as_a1111_accepts_them(api):
    """What webuiapi sends by default: eta 1 (what ancestral samplers use; ignored by deterministic ones), s_tmax
    0 without churn (A1111's "no limit"), image_cfg_scale on a model that is not instruct-pix2pix, nulls meaning the default, and
    inpainting_fill without a mask (it only says what a masked area starts from)."""
    common = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1, "eta": 1.0, "s_tmax": 0, "s_tmin": 0,
              "s_churn": 0, "s_noise": 1, "seed_resize_from_h": 0, "styles": [], "subseed": None, "scheduler": None}
    for sampler in ("Euler a", "Euler", "DPM++ 2M"):
        response = api.post("/sdapi/v1/txt2img", json={**common, "sampler_name": sampler})
        assert response.status_code == 200, (sampler, response.text)
    # DDIM honours eta as A1111's does: 0 (eta_ddim) and webuiapi's 1 both draw, and differently
    ddim = [api.post("/sdapi/v1/txt2img", json={**common, "sampler_name": "DDIM", "eta": eta}) for eta in (0, 1.0)]
    assert [r.status_code for r in ddim] == [200, 200]
    assert ddim[0].json()["images"][0] != ddim[1].json()["images"][0]
    picture = b64png(sample_picture(64, 64))
    img2img = {**common, "init_images": [picture], "image_cfg_scale": 1.5, "inpainting_fill": 0,
               "denoising_strength": 0.5, "initial_noise_multiplier": 1}
    assert api.post("/sdapi/v1/img2img", json=img2img).status_code == 200
    bad = api.post("/sdapi/v1/img2img", json={**img2img, "mask": b64png(sample_mask(64, 64)), "inpainting_fill": 4})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "inpainting_fill"]


@pytest.mark.parametrize("number,name", [(0, "fill"), (2, "latent noise"), (3, "latent nothing")])
def test_inpainting_fill_numbers_are_a1111s_masked_content(api, server, number, name):
    picture, mask = sample_picture(64, 64), sample_mask(64, 64)
    response = api.post("/sdapi/v1/img2img", json={
        "init_images": [b64png(picture)], "mask": b64png(mask), "inpainting_fill": number, "prompt": "a red door",
        "denoising_strength": 0.8, "mask_blur": 0, "inpaint_full_res": False, "steps": 4, "seed": 9, "width": 64,
        "height": 64, "sampler_name": "Euler"})
    assert response.status_code == 200, response.text
    direct = Client(server.url).img2img("a red door", picture, mask, inpainting_fill=name, denoising_strength=0.8,
                                        mask_blur=0, steps=4, seed=9, width=64, height=64, sampler="Euler",
                                        k_diffusion=True)
    assert (np.asarray(decode(response.json()["images"][0])) == direct.images[0]).all()
    assert f"Masked content: {name}" in json.loads(response.json()["info"])["infotexts"][0]


def test_unknown_keys_are_ignored_and_listed(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                   "no_such_field": 1, "override_settings": {"sd_vae": "Automatic",
                                                                                             "some_option": 3}})
    assert response.status_code == 200, response.text
    expected = ["no_such_field", "override_settings.some_option"]
    assert response.headers["X-Sdtrt-Ignored-Fields"] == ",".join(expected)
    info = json.loads(response.json()["info"])
    assert info["sdtrt_ignored_fields"] == expected
    assert 0 <= info["subseed"] < 2**32 and info["all_subseeds"] == [info["subseed"]]  # resolved, not -1


def test_out_of_range_values_name_the_a1111_field(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "cfg_scale": 99, "steps": 2})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "cfg_scale"] and "from 0 to 30" in detail["msg"]
    response = api.post("/sdapi/v1/img2img", json={"init_images": ["not base64!"], "prompt": "x"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "init_images"]


def test_info_endpoints(api, server):
    samplers = api.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler a", "aliases": ["k_euler_a", "k_euler_ancestral"], "options": {}} in samplers
    names = {s["name"] for s in samplers}
    assert len(samplers) == 29 and "Restart" in names and "DDIM CFG++" in names
    schedulers = api.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential",
                                                "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal",
                                                "DDIM", "Beta"]
    assert {"name": "align_your_steps", "label": "Align Your Steps"}.items() <= schedulers[7].items()
    models = api.get("/sdapi/v1/sd-models").json()
    spec = Client(server.url).spec
    assert models == [{"title": f"{spec.model_name} [{spec.model_hash}]", "model_name": spec.model_name,
                       "hash": spec.model_hash, "sha256": spec.source_hash, "filename": Path(spec.source).name,
                       "config": None}]  # the file's name: its path on the server's disk stays there
    progress = api.get("/sdapi/v1/progress").json()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert api.get("/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]["post"]


def test_options_set_clip_skip_and_refuse_what_they_cannot(api):
    options = api.get("/sdapi/v1/options").json()
    assert options["CLIP_stop_at_last_layers"] == 1
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2,
                                               "sd_model_checkpoint": options["sd_model_checkpoint"]}).status_code == 200
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
    assert "Clip skip: 2" in json.loads(response.json()["info"])["infotexts"][0]
    refused = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned.safetensors"})
    assert refused.status_code == 422 and "not one of this server's models" in refused.text
    for key, value in (("sd_vae", "vae-ft-mse"), ("emphasis", "Strong"), ("sd_noise_schedule", "Cosine"),
                       ("sgm_noise_multiplier", "yes"), ("hypertile_swap_size_unet", 0)):
        refused = api.post("/sdapi/v1/options", json={key: value})  # not a VAE of this server, not a choice, ...
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", f"options.{key}"]
    assert api.post("/sdapi/v1/options", json={"emphasis": "No norm", "sd_vae": "None"}).status_code == 200
    assert (api.get("/sdapi/v1/options").json()["emphasis"], api.get("/sdapi/v1/options").json()["sd_vae"]) == \
        ("No norm", "None")
    assert api.post("/sdapi/v1/options", json={"emphasis": "Original", "sd_vae": "Automatic"}).status_code == 200
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
    # the round trip scripts do: GET, edit, POST back; options sdtrt has no use for are kept
    options = api.get("/sdapi/v1/options").json()
    assert api.post("/sdapi/v1/options", json={**options, "show_progressbar": False}).status_code == 200
    assert api.get("/sdapi/v1/options").json()["show_progressbar"] is False


def test_schema_driven_bad_input_never_breaks_the_gateway(api, server):
    """schemathesis: invalid bodies for every operation (and valid ones for the cheap GETs) get a 4xx, never a
    5xx, and responses match the served OpenAPI schema. Bounded: a few examples per operation."""
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.NEGATIVE] + ([GenerationMode.POSITIVE] if operation.method.upper() == "GET" else [])
        for mode in modes:
            @hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                if isinstance(case.body, dict) and operation.path.endswith(("/txt2img", "/img2img")):
                    # A mutation elsewhere leaves a valid request of A1111's defaults (512x512, 50 steps: seconds
                    # each); absent or null size and steps become small ones so the check stays bounded.
                    for key, small in (("steps", 2), ("width", 64), ("height", 64), ("n_iter", 1), ("batch_size", 1)):
                        if case.body.get(key) is None:
                            case.body[key] = small
                response = case.call()
                assert response.status_code < 500, (case.body, response.text)

            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # nothing invalid to send (a GET without parameters)
                continue
            checked += 1
    assert checked >= 8
    assert Client(server.url).txt2img("still serving", steps=2, width=64, height=64).images.shape == (1, 64, 64, 3)


def test_sdtrt_api_command_serves_http(server, tmp_path):
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "api", "--url", server.url, "--port", str(port),
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = json.dumps({"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1,
                           "save_images": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", data=body,
                                         headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    result = json.loads(response.read())
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        assert len(result["images"]) == 1
        assert (tmp_path / "txt2img-images" / "00001-1.png").is_file()  # save_images, as A1111 saves them
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it as root)")
def test_gradio_page_generates_an_image_in_headless_chromium(server, tmp_path):
    page_generates(server.url, tmp_path)


def test_gradio_page_with_auth_asks_for_a_login(server, tmp_path):
    """`sdtrt ui --gradio-auth` (as A1111's): the page's config is refused until the login form is sent with the
    right credentials, and a wrong password is refused."""
    import http.cookiejar
    import urllib.parse

    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "ui", "--url", server.url, "--port", str(port),
                             "--gradio-auth", "carol:pa55word", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        assert first_answer(f"{base}/config", proc) == 401  # the page's config only after a login

        def login(password: str) -> int:
            form = urllib.parse.urlencode({"username": "carol", "password": password}).encode()
            try:
                return opener.open(urllib.request.Request(f"{base}/login", data=form), timeout=10).status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert login("wrong") >= 400
        assert login("pa55word") == 200
        assert opener.open(f"{base}/config", timeout=10).status == 200
    finally:
        proc.terminate()
        output = output_of(proc)
    assert "pa55word" not in output


def test_png_info_and_sd_vae_endpoints(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "seed": 5})
    image = response.json()["images"][0]
    info = api.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert info["info"] == json.loads(response.json()["info"])["infotexts"][0]
    assert info["parameters"]["Seed"] == "5" and info["items"] == {}
    refused = api.post("/sdapi/v1/png-info", json={"image": "not base64!"})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "image"]
    assert api.get("/sdapi/v1/sd-vae").json() == []  # the default model keeps its own VAE


def test_settings_from_an_infotext_as_a1111_reads_them(api):
    """A1111 1.9+'s ``infotext`` field: the settings an infotext records, explicit fields winning; its words for
    resize modes ("Crop and resize") are read as A1111 numbers them, not a server error."""
    text = "a cat\nNegative prompt: dogs\nSteps: 3, Sampler: Euler, Seed: 11, Size: 64x64, Resize mode: Crop and resize"
    response = api.post("/sdapi/v1/txt2img", json={"infotext": text, "seed": 12})
    assert response.status_code == 200, response.text
    _, _, params = parse_infotext(decode(response.json()["images"][0]).info["parameters"])
    assert params["Steps"] == "3" and params["Seed"] == "12" and params["Size"] == "64x64"
    picture = b64png(sample_picture(64, 64))
    response = api.post("/sdapi/v1/img2img", json={"init_images": [picture], "infotext": text})
    assert response.status_code == 200, response.text
    assert "Resize mode: Crop and resize" in json.loads(response.json()["info"])["infotexts"][0]
    bad = api.post("/sdapi/v1/img2img", json={"init_images": [picture], "infotext": text.replace("Crop", "Squash")})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "resize_mode"], bad.text


def test_the_noise_source_option_as_a1111_sets_it(api):
    """A1111's randn_source option: NV (and GPU, which gives NV's numbers on an NVIDIA card) or CPU, per request
    through override_settings or for every request through /options; the infotext says which."""
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler"}
    nv = api.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"randn_source": "GPU"}})
    assert nv.status_code == 200, nv.text
    assert "RNG: NV" in json.loads(nv.json()["info"])["infotexts"][0]
    cpu = api.post("/sdapi/v1/txt2img", json=body)
    assert "RNG: CPU" in json.loads(cpu.json()["info"])["infotexts"][0]
    assert cpu.json()["images"] != nv.json()["images"]
    bad = api.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"randn_source": "TPU"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "override_settings.randn_source"]
    ancestral = api.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler a",
                                                    "override_settings": {"randn_source": "NV"}})
    assert ancestral.status_code == 200, ancestral.text  # its step noise is NV's too (k-diffusion draws it)
    assert "RNG: NV" in json.loads(ancestral.json()["info"])["infotexts"][0]
    lcm = api.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "LCM",
                                              "override_settings": {"randn_source": "NV"}})
    assert lcm.status_code == 422  # only diffusers' scheduler draws LCM's step noise
    assert lcm.json()["detail"][0]["loc"] == ["body", "override_settings.randn_source"]
    assert api.post("/sdapi/v1/options", json={"randn_source": "NV"}).status_code == 200
    try:
        assert api.get("/sdapi/v1/options").json()["randn_source"] == "NV"
        again = api.post("/sdapi/v1/txt2img", json=body)
        assert "RNG: NV" in json.loads(again.json()["info"])["infotexts"][0]
    finally:
        api.post("/sdapi/v1/options", json={"randn_source": "CPU"})


def test_several_init_images_one_picture_each(api, server):
    picture = sample_picture(64, 64)
    other = np.ascontiguousarray(picture[::-1])
    body = {"init_images": [b64png(picture), b64png(other)], "prompt": "a red door", "denoising_strength": 0.7,
            "steps": 3, "seed": 9, "width": 64, "height": 64, "sampler_name": "Euler", "batch_size": 2}
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    images = [np.asarray(decode(image)) for image in response.json()["images"]]
    client = Client(server.url)
    for image, init, seed in zip(images, (picture, other), (9, 10)):
        direct = client.img2img("a red door", init, denoising_strength=0.7, steps=3, seed=seed, width=64, height=64,
                                sampler="Euler", k_diffusion=True)
        assert (image == direct.images[0]).all()
    assert json.loads(response.json()["info"])["all_seeds"] == [9, 10]
    refused = api.post("/sdapi/v1/img2img", json={**body, "init_images": [b64png(picture)] * 3})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "init_images"]
