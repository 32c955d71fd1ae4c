"""webuiapi, the third-party Python client most A1111 scripts use, against `sdtrt api` over real HTTP, called as its
README shows (its defaults included: eta 1, s_tmax 0, image_cfg_scale 1.5, inpainting_fill 0, ...)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

from servers import first_answer, free_ports, output_of
from sdtrt.requests.infotext import parse_infotext

webuiapi = pytest.importorskip("webuiapi")

# A1111's styles.csv format: a style with {prompt} wraps the prompt, one without is appended after a comma.
STYLES_CSV = """name,prompt,negative_prompt
Oil painting,"oil painting of {prompt}, thick brush strokes","photo, blurry"
Dusk,"at dusk, warm light",
"""


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    (port,) = free_ports(1)
    out = tmp_path_factory.mktemp("webuiapi-outputs")
    (out / "styles.csv").write_text(STYLES_CSV)
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "api", "--url", server.url, "--port", str(port),
                             "--out", str(out), "--styles-file", str(out / "styles.csv"),
                             "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert first_answer(f"http://127.0.0.1:{port}/sdapi/v1/samplers", proc) == 200
    yield webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=4)
    proc.terminate()
    proc.wait(30)


def test_txt2img_with_webuiapis_defaults(gateway):
    result = gateway.txt2img(prompt="cute squirrel", negative_prompt="ugly, out of frame", seed=1003, cfg_scale=7,
                             width=64, height=64)
    assert result.image.size == (64, 64)
    _, _, params = parse_infotext(result.image.info["parameters"])
    assert params["Seed"] == "1003" and params["Sampler"] == "Euler a" and params["Steps"] == "4"
    assert result.info["seed"] == 1003 and result.info["all_seeds"] == [1003]
    assert result.parameters["prompt"] == "cute squirrel"


def test_a1111s_sampler_settings_and_k_diffusion_samplers(gateway):
    """What A1111's clients send and A1111 honours: eta 0 with Euler a, sigma churn, ENSD through options, and a
    sampler only k-diffusion has; each recorded in the infotext as A1111 writes it."""
    result = gateway.txt2img(prompt="a fox", seed=3, width=64, height=64, sampler_name="Euler a", eta=0, steps=3)
    _, _, params = parse_infotext(result.image.info["parameters"])
    assert params["Eta"] == "0"
    gateway.set_options({"eta_noise_seed_delta": 31337})
    try:
        assert gateway.get_options()["eta_noise_seed_delta"] == 31337
        result = gateway.txt2img(prompt="a fox", seed=3, width=64, height=64, sampler_name="DPM++ 2S a", steps=3,
                                 s_noise=0.95)
    finally:
        gateway.set_options({"eta_noise_seed_delta": 0})
    _, _, params = parse_infotext(result.image.info["parameters"])
    assert params["Sampler"] == "DPM++ 2S a" and params["ENSD"] == "31337" and params["Sigma noise"] == "0.95"
    assert "DPM++ 3M SDE" in [s["name"] for s in gateway.get_samplers()]


def test_txt2img_batch_and_hires_fix(gateway):
    result = gateway.txt2img(prompt="a lighthouse", seed=7, width=64, height=64, batch_size=2, enable_hr=True,
                             hr_scale=1.5, hr_upscaler=webuiapi.HiResUpscaler.Latent, hr_second_pass_steps=2,
                             denoising_strength=0.6)
    assert [im.size for im in result.images] == [(96, 96), (96, 96)]
    assert result.info["all_seeds"] == [7, 8]


def test_img2img_and_inpainting_as_its_readme_shows(gateway):
    picture = gateway.txt2img(prompt="cute cat", seed=104, width=64, height=64).image
    result = gateway.img2img(images=[picture], prompt="cute cat, oil painting", seed=5, cfg_scale=6.5,
                             denoising_strength=0.6, width=64, height=64)
    assert result.image.size == (64, 64)
    mask = Image.new("RGB", picture.size, color="black")
    ImageDraw.Draw(mask).ellipse((16, 16, 40, 40), fill="white")
    inpainted = gateway.img2img(images=[picture], mask_image=mask, inpainting_fill=1, prompt="cute cat", seed=104,
                                cfg_scale=5.0, denoising_strength=0.7, width=64, height=64)
    change = np.abs(np.asarray(inpainted.image).astype(int) - np.asarray(picture).astype(int)).max(axis=2)
    far = np.ones_like(change, dtype=bool)
    far[4:52, 4:52] = False  # the mask (16..40) and its blur (mask_blur 4: a few sigmas around it)
    assert change[far].max() <= 1  # only the masked area changed
    assert change[24:32, 24:32].mean() > 2


def test_options_round_trip(gateway):
    options = gateway.get_options()
    assert options["sd_model_checkpoint"]
    options["CLIP_stop_at_last_layers"] = 2
    gateway.set_options(options)
    assert gateway.get_options()["CLIP_stop_at_last_layers"] == 2
    gateway.set_options({"CLIP_stop_at_last_layers": 1})


def start_gateway(server, out, options_file):
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "api", "--url", server.url, "--port", str(port),
                             "--out", str(out), "--options-file", str(options_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert first_answer(f"http://127.0.0.1:{port}/sdapi/v1/samplers", proc) == 200
    return proc, webuiapi.WebUIApi(host="127.0.0.1", port=port)


def test_every_a1111_option_with_its_default_kept_across_a_restart(server, tmp_path):
    """A1111 keeps its options in config.json: GET /options has every key A1111 has, with A1111's default; what a
    user sets, sdtrt's or not, reads back the same after the gateway restarts."""
    options_file = tmp_path / "options.json"
    proc, api = start_gateway(server, tmp_path / "out", options_file)
    try:
        options = api.get_options()
        assert len(options) > 320  # the keys A1111 1.10 returns, its built-in extensions' included
        assert options["emphasis"] == "Original" and options["lora_preferred_name"] == "Alias from file"
        assert "k_sched_type" not in options  # gone since A1111 1.9's Schedule type
        assert (options["samples_save"], options["jpeg_quality"], options["face_restoration_model"]) == \
            (True, 80, "CodeFormer")
        assert (options["eta_ancestral"], options["s_noise"], options["eta_noise_seed_delta"]) == (1.0, 1.0, 0)
        api.set_options({"jpeg_quality": 95, "eta_noise_seed_delta": 31337, "CLIP_stop_at_last_layers": 2,
                         "some_extension_option": [1, "two"]})
    finally:
        proc.terminate()
        proc.wait(30)
    assert options_file.is_file() and not list(tmp_path.glob("*.tmp*"))
    proc, api = start_gateway(server, tmp_path / "out", options_file)
    try:
        options = api.get_options()
        assert (options["jpeg_quality"], options["eta_noise_seed_delta"], options["CLIP_stop_at_last_layers"],
                options["some_extension_option"]) == (95, 31337, 2, [1, "two"])
        _, _, params = parse_infotext(api.txt2img(prompt="x", steps=2, width=64, height=64, seed=1,
                                                  sampler_name="Euler a").image.info["parameters"])
        assert params["ENSD"] == "31337" and params["Clip skip"] == "2"
    finally:
        proc.terminate()
        proc.wait(30)


def test_info_calls(gateway):
    assert "Euler a" in [s["name"] for s in gateway.get_samplers()]
    assert [m["model_name"] for m in gateway.get_sd_models()]
    assert "progress" in gateway.get_progress()


def test_api_auth_as_a1111s(server, tmp_path, monkeypatch):
    """`sdtrt api --api-auth` (here from the environment and a file, merged): webuiapi with its credentials works,
    a request without them gets 401, and the password never shows in the gateway's output."""
    (port,) = free_ports(1)
    users = tmp_path / "users.txt"
    users.write_text("bob:hunter2\n")
    env = {**__import__("os").environ, "SDTRT_API_AUTH": "alice:s3cret-pass"}
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "api", "--url", server.url, "--port", str(port),
                             "--api-auth-path", str(users), "--out", str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/sdapi/v1/samplers"
        assert first_answer(url, proc) == 401  # served only with credentials
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.headers["WWW-Authenticate"].startswith("Basic")
        for user, password in (("alice", "s3cret-pass"), ("bob", "hunter2")):
            api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username=user, password=password, steps=2)
            assert api.txt2img(prompt="a cat", seed=1, width=64, height=64).image.size == (64, 64)
        wrong = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="alice", password="nope", steps=2)
        with pytest.raises(Exception):
            wrong.txt2img(prompt="a cat", seed=1, width=64, height=64)
    finally:
        proc.terminate()
        output = output_of(proc)
    assert "s3cret-pass" not in output and "hunter2" not in output and "HTTP basic auth" in output


def test_credentials_parsing_never_echoes_a_password():
    import argparse

    from sdtrt.client.apps.cli_generate import credentials
    from sdtrt.contract.errors import UsageError

    args = argparse.Namespace(auth_flag="api-auth", auth_env="SDTRT_TEST_NO_SUCH_VAR", api_auth="a:1,b:2:3",
                              api_auth_path=None)
    assert credentials(args) == {"a": "1", "b": "2:3"}
    args.api_auth = "a:1,justapassword"
    with pytest.raises(UsageError) as error:
        credentials(args)
    assert "justapassword" not in str(error.value) and "USER:PASS" in str(error.value)


def test_png_info_reads_what_txt2img_wrote(gateway):
    picture = gateway.txt2img(prompt="a lighthouse, (oil painting:1.2)", negative_prompt="blurry", seed=77,
                              width=64, height=96).image
    info = gateway.png_info(picture)
    assert info.info == picture.info["parameters"]
    params = info.parameters
    assert params["Prompt"] == "a lighthouse, (oil painting:1.2)" and params["Negative prompt"] == "blurry"
    assert params["Seed"] == "77" and (params["Size-1"], params["Size-2"]) == ("64", "96")
    plain = Image.new("RGB", (8, 8))
    empty = gateway.png_info(plain)
    assert (empty.info, empty.parameters) == ("", {})


def test_interrupt_and_skip_stop_the_servers_loop(gateway):
    """webuiapi's interrupt() while a long txt2img runs in another thread: the server's loop stops within a step
    and the call answers with the batches it had finished (none here); skip() drops the running batch of two and
    the next one is done (its seed is the second)."""
    import threading

    long = dict(prompt="a long one", steps=150, width=512, height=512, seed=40)  # ~14 s here: far beyond 6
    outcome: dict = {}

    def generate(**settings) -> None:
        start = time.perf_counter()
        outcome["result"] = gateway.txt2img(**settings)
        outcome["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=generate, kwargs=long)
    worker.start()
    time.sleep(1.5)
    gateway.interrupt()
    worker.join(60)
    assert outcome["result"].images == [] and outcome["seconds"] < 6
    worker = threading.Thread(target=generate, kwargs={**long, "n_iter": 2, "steps": 30})
    worker.start()
    time.sleep(1.0)
    gateway.skip()
    worker.join(120)
    assert len(outcome["result"].images) == 1 and outcome["result"].info["all_seeds"] == [41]


@pytest.mark.slow  # several long generations at once
def test_progress_per_step_and_per_task_under_concurrency(gateway):
    """Two generations at once, each sent with its own force_task_id: /progress?id_task= follows each one's
    steps as the server's loop posts them (A1111's sampling_step / sampling_steps), and webuiapi's
    get_progress() shows the latest one."""
    import threading

    def post(task: str, steps: int) -> None:
        body = json.dumps({"prompt": "a slow one", "steps": steps, "width": 512, "height": 512, "seed": 1,
                                  "force_task_id": task}).encode()
        request = urllib.request.Request(f"{gateway.baseurl}/txt2img", data=body,
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=300).read()

    workers = [threading.Thread(target=post, args=(task, steps)) for task, steps in (("task-a", 40), ("task-b", 60))]
    for worker in workers:
        worker.start()
    seen: dict[str, set] = {"task-a": set(), "task-b": set()}
    previews: dict[str, list] = {"task-a": [], "task-b": []}
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        for task in seen:
            with urllib.request.urlopen(f"{gateway.baseurl}/progress?id_task={task}", timeout=10) as response:
                answer = json.loads(response.read())
            state = answer["state"]
            if state["sampling_steps"]:
                seen[task].add((state["sampling_step"], state["sampling_steps"]))
            if answer["current_image"]:
                previews[task].append(answer["current_image"])
        latest = gateway.get_progress()
        assert 0.0 <= latest["progress"] <= 1.0
        time.sleep(0.2)
    for worker in workers:
        worker.join(120)
    assert {total for _, total in seen["task-a"]} == {40} and {total for _, total in seen["task-b"]} == {60}
    for task in seen:  # several distinct steps seen on the way, each within its range
        steps = sorted(step for step, _ in seen[task])
        assert len(steps) >= 3 and all(1 <= s <= t for s, t in seen[task]), (task, steps)
    assert gateway.get_progress()["state"]["job_count"] == 0  # nothing under way any more
    for task, pictures in previews.items():  # live previews at the latents' resolution, changing as it denoises
        sizes = {Image.open(io.BytesIO(base64.b64decode(p))).size for p in pictures}
        assert len(sizes) == 1 and 512 % next(iter(sizes))[0] == 0 and next(iter(sizes))[0] < 512, (task, sizes)
        assert len(set(pictures)) >= 2, task


def test_progress_skips_the_preview_when_asked(gateway):
    """skip_current_image=true (as A1111's) leaves current_image out while the steps still come."""
    import threading

    body = json.dumps({"prompt": "a slow one", "steps": 40, "width": 512, "height": 512,
                              "force_task_id": "task-c"}).encode()
    request = urllib.request.Request(f"{gateway.baseurl}/txt2img", data=body,
                                     headers={"Content-Type": "application/json"})
    worker = threading.Thread(target=lambda: urllib.request.urlopen(request, timeout=300).read())
    worker.start()
    answers = []
    while worker.is_alive():
        url = f"{gateway.baseurl}/progress?id_task=task-c&skip_current_image=true"
        with urllib.request.urlopen(url, timeout=10) as response:
            answers.append(json.loads(response.read()))
        time.sleep(0.2)
    worker.join()
    assert any(a["state"]["sampling_step"] for a in answers)
    assert all(a["current_image"] is None for a in answers)


def test_prompt_styles_from_a1111s_styles_file(gateway):
    styles = gateway.get_prompt_styles()
    assert [st["name"] for st in styles] == ["Oil painting", "Dusk"]
    assert styles[0]["negative_prompt"] == "photo, blurry"
    result = gateway.txt2img(prompt="a red fox", negative_prompt="ugly", styles=["Oil painting", "Dusk", "Nope"],
                             seed=5, width=64, height=64)
    prompt, negative, _ = parse_infotext(result.image.info["parameters"])
    assert prompt == "oil painting of a red fox, thick brush strokes, at dusk, warm light"
    assert negative == "ugly, photo, blurry"
    assert result.info["prompt"] == prompt and result.info["styles"] == ["Oil painting", "Dusk", "Nope"]
    assert result.info["sdtrt_ignored_fields"] == ["styles.Nope"]  # A1111 skips an unknown style; sdtrt says so
    styled = gateway.txt2img(prompt=prompt, negative_prompt=negative, seed=5, width=64, height=64)
    assert np.array_equal(np.asarray(result.image), np.asarray(styled.image))  # the same as writing it out


def test_extra_single_image_upscales_as_a1111(gateway):
    """A1111's Extras sizes: by a factor, rounded down to a multiple of 8; to a size with crop, exactly that size;
    the picture's infotext kept, what was done in its ``postprocessing`` text."""
    picture = gateway.txt2img(prompt="a house", seed=3, width=64, height=64).image
    result = gateway.extra_single_image(picture, upscaler_1="Lanczos", upscaling_resize=1.7)
    assert result.image.size == (104, 104)  # 64 * 1.7 = 108.8 -> 104
    assert result.image.info["parameters"] == picture.info["parameters"]
    assert result.image.info["postprocessing"] == "Postprocess upscale by: 1.7, Postprocess upscaler: Lanczos"
    expected = picture.convert("RGB").resize((108, 108), Image.Resampling.LANCZOS).resize((104, 104),
                                                                                       Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(result.image), np.asarray(expected))
    wide = gateway.extra_single_image(picture, resize_mode=1, upscaling_resize_w=200, upscaling_resize_h=120,
                                      upscaler_1="Nearest", upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5)
    assert wide.image.size == (200, 120)
    assert "Postprocess upscaler 2: Lanczos" in wide.image.info["postprocessing"]
    same = gateway.extra_single_image(picture)  # upscaler_1 "None": nothing to do, as A1111
    assert same.image.size == (64, 64)
    for payload, field in (({"upscaler_1": "ESRGAN_4x"}, "upscaler_1"), ({"gfpgan_visibility": 0.5}, "gfpgan_visibility"),
                           ({"upscaler_1": "Lanczos", "upscaling_resize": 8, "image": big_picture()}, "upscaling_resize")):
        body = {"image": encode(picture), **payload}
        answer = post_json(gateway, "extra-single-image", body)
        assert answer["status"] == 422 and answer["body"]["detail"][0]["loc"] == ["body", field], answer


def test_extra_batch_images_through_webuiapi(gateway):
    """webuiapi's extra_batch_images: each picture as extra-single-image upscales it."""
    pictures = [gateway.txt2img(prompt="a house", seed=s, width=64, height=64).image for s in (3, 4)]
    result = gateway.extra_batch_images(pictures, upscaler_1="Lanczos", upscaling_resize=1.5)
    assert [image.size for image in result.images] == [(96, 96), (96, 96)]
    single = gateway.extra_single_image(pictures[1], upscaler_1="Lanczos", upscaling_resize=1.5)
    assert np.array_equal(np.asarray(result.images[1]), np.asarray(single.image))


def big_picture() -> str:
    return encode(Image.new("RGB", (1100, 1100)))


def encode(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post_json(gateway, path: str, body: dict) -> dict:

    request = urllib.request.Request(f"{gateway.baseurl}/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return {"status": response.status, "body": json.loads(response.read())}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": json.loads(exc.read())}


def test_memory_cmd_flags_and_what_sdtrt_has_none_of(gateway):

    def get(path: str):
        with urllib.request.urlopen(f"{gateway.baseurl}/{path}", timeout=10) as response:
            return json.loads(response.read())

    memory = get("memory")  # the Triton server's host, from its own metrics
    assert memory["ram"]["total"] > memory["ram"]["used"] > 0 and memory["ram"]["free"] > 0
    assert memory["cuda"] == {"error": "unavailable"}  # this CPU server has no GPU
    flags = gateway.get_cmd_flags()
    assert flags["api"] is True and flags["nowebui"] is True and flags["api_auth"] is None
    assert "sdtrt_metrics_url" not in flags and "sdtrt_server" not in flags  # internal addresses stay inside
    assert gateway.get_hypernetworks() == [] and gateway.get_face_restorers() == []
    scripts = get("scripts")  # A1111's names: titles, lower case (always-on ones: test_a1111_scripts)
    assert gateway.get_realesrgan_models() == [] and scripts["txt2img"][:2] == ["prompt matrix", "x/y/z plot"]
    assert scripts["img2img"][:4] == ["prompt matrix", "x/y/z plot", "loopback", "sd upscale"]


def test_errors_come_in_a1111s_shape(gateway):
    answer = post_json(gateway, "txt2img", {"prompt": "x", "steps": 10 ** 6})
    assert answer["status"] == 422 and answer["body"]["detail"][0]["loc"] == ["body", "steps"]
    assert answer["body"]["error"] and "steps" in answer["body"]["errors"]
    try:
        urllib.request.urlopen(f"{gateway.baseurl}/no-such-endpoint", timeout=10)
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
        assert exc.code == 404 and body["error"] == "HTTPException" and body["detail"] == "Not Found"
    else:
        raise AssertionError("404 expected")
