"""ControlNet (A1111's sd-webui-controlnet): ControlNets registered at export (``--controlnets DIR``), run each step
by the served loop for the units a request enables, their residuals passed to the U-Net.

The references are diffusers' own: StableDiffusionControlNetPipeline (and its multi-ControlNet form) with the
ControlNets loaded by diffusers from the same files, on the same weights, seed and control picture. The files are
random ControlNets of the default model's U-Net in the layouts A1111's models folder holds: the original layout
(lllyasviel's ``control_*`` files: .safetensors, and a .pth read weights-only), written from the diffusers model by
the test's own key map, and a diffusers folder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff, sample_picture
from servers import triton_on
from sdtrt.client import Client, ServerRefused
from sdtrt.contract.errors import InvalidRequest, UsageError
from sdtrt.pipeline.local import LocalPipeline
from sdtrt.requests.controlnet import ControlUnit, units_json
from sdtrt.requests.request import Txt2ImgRequest

REQUEST = dict(prompt="a red house by a lake", negative_prompt="blur", sampler="Euler", steps=6, seed=11, width=64,
               height=64, guidance_scale=7.0)
CANNY, DEPTH, OLD = "control_v11p_sd15_canny", "control_sd15_depth", "control_sd15_scribble"


def _ldm_keys(state: dict, config: dict) -> dict:
    """The original layout of a diffusers ControlNet, restated here from lllyasviel's cldm code (not sdtrt's map):
    its U-Net encoder half under LDM names, zero_convs.i.0, input_hint_block.(2k), middle_block_out.0."""
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    places = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "controlnet_mid_block": "middle_block_out.0",
              "mid_block.attentions.0": "middle_block.1"}
    block = 1
    for i in range(len(config["block_out_channels"])):
        for j in range(config["layers_per_block"]):
            places[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{block}.0"
            places[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{block}.1"
            block += 1
        if i < len(config["block_out_channels"]) - 1:
            places[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
            block += 1
    for i in range(block):
        places[f"controlnet_down_blocks.{i}"] = f"zero_convs.{i}.0"
    hint = sorted({int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    for index, name in enumerate(["conv_in", *[f"blocks.{i}" for i in hint], "conv_out"]):
        places[f"controlnet_cond_embedding.{name}"] = f"input_hint_block.{2 * index}"
    out = {}
    for key, value in state.items():
        for old, new in sorted(places.items(), key=lambda p: -len(p[0])):
            if key.startswith(old + "."):
                rest = key[len(old) + 1:]
                for before, after in resnet.items():
                    if new.endswith((".0", "middle_block.0", "middle_block.2")) and rest.startswith(before + ".") \
                            and "resnets" in old:
                        rest = after + rest[len(before):]
                out[f"{new}.{rest}"] = value
                break
        else:
            for k in (0, 1):
                if key.startswith(f"mid_block.resnets.{k}."):
                    rest = key[len(f"mid_block.resnets.{k}."):]
                    first = rest.split(".")[0]
                    rest = resnet.get(first, first) + rest[len(first):]
                    out[f"middle_block.{2 * k}.{rest}"] = value
                    break
            else:
                raise AssertionError(f"no original-layout place for {key}")
    return out


def _controlnet(unet, seed: int):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 64))
    with torch.no_grad():  # (from_unet zeroes the residual convolutions: random ones make the test see them)
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return controlnet.eval()


@pytest.fixture(scope="module")
def controlnets(default_model, tmp_path_factory):
    """Three ControlNets of the default model: canny in the original layout (.safetensors), depth as a diffusers
    folder, scribble in the original layout with the first releases' ``control_model.`` prefix, as a .pth; and
    the config folder diffusers needs beside a single file, offline."""
    from diffusers import UNet2DConditionModel

    folder, config = tmp_path_factory.mktemp("ControlNet"), tmp_path_factory.mktemp("controlnet-config")
    unet = UNet2DConditionModel.from_pretrained(str(default_model / "unet"), local_files_only=True)
    models = {CANNY: _controlnet(unet, 1), DEPTH: _controlnet(unet, 2), OLD: _controlnet(unet, 3)}
    canny = _ldm_keys(models[CANNY].state_dict(), dict(models[CANNY].config))
    save_file({k: v.contiguous() for k, v in canny.items()}, str(folder / f"{CANNY}.safetensors"))
    models[DEPTH].save_pretrained(str(folder / DEPTH))
    old = _ldm_keys(models[OLD].state_dict(), dict(models[OLD].config))
    torch.save({"state_dict": {f"control_model.{k}": v for k, v in old.items()}}, str(folder / f"{OLD}.pth"))
    models[CANNY].save_config(str(config))
    return folder, config


@pytest.fixture(scope="module")
def repo(default_model, controlnets, tmp_path_factory):
    """The default model exported with `sdtrt export --controlnets DIR` (the .pth read weights-only)."""
    from sdtrt.client.apps.cli import main as cli

    out = tmp_path_factory.mktemp("controlnet-repo") / "repo"
    # (on onnxruntime, the pictures' reference, as the library's exports: `auto`'s first-start timing is
    # tests/test_runners.py's to check)
    assert cli(["export", str(default_model), "--out", str(out), "--controlnets", str(controlnets[0]),
                "--cpu-engine", "onnxruntime"]) == 0
    return out


@pytest.fixture(scope="module")
def local(repo) -> LocalPipeline:
    return LocalPipeline(repo)


FILES = {CANNY: f"{CANNY}.safetensors", DEPTH: DEPTH, OLD: f"{OLD}.pth"}


def _diffusers_controlnet(controlnets, name):
    """The ControlNet as diffusers itself loads its file (its own single-file conversion) or folder."""
    from diffusers import ControlNetModel

    folder, config = controlnets
    path = folder / FILES[name]
    if path.is_dir():
        return ControlNetModel.from_pretrained(str(path), local_files_only=True)
    return ControlNetModel.from_single_file(str(path), config=str(config), local_files_only=True,
                                            torch_dtype=torch.float32)


def _pipe(default_model, controlnet):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, dtype=torch.float32)
    parts = {k: v for k, v in base.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


REFERENCE = dict(prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], sampler=REQUEST["sampler"],
                 steps=REQUEST["steps"], cfg=REQUEST["guidance_scale"], seed=REQUEST["seed"], width=64, height=64)


def _units(*units: ControlUnit) -> str:
    return units_json(list(units))


def _a1111_window(start: float, end: float, steps: int) -> tuple[float, float]:
    """diffusers' control_guidance_start/end that run the steps sd-webui-controlnet runs: it steers step i while
    A1111's sampling step (i - 1, the last finished one; 0 at first) over the steps lies in [start, end], diffusers
    while i / steps >= start' and (i + 1) / steps <= end'."""
    active = [i for i in range(steps) if start <= max(i - 1, 0) / steps <= end]
    assert active and active == list(range(active[0], active[-1] + 1))
    return (active[0] - 0.5) / steps if active[0] else 0.0, min((active[-1] + 1.5) / steps, 1.0)


@pytest.mark.parametrize("name, weight", [(CANNY, 0.8), (DEPTH, 1.0), (OLD, 1.3)])
def test_one_unit_draws_diffusers_controlnet_picture(default_model, controlnets, local, name, weight):
    picture = sample_picture(64, 64)
    pipe = _pipe(default_model, _diffusers_controlnet(controlnets, name))
    expected = diffusers_images(pipe, image=Image.fromarray(picture), controlnet_conditioning_scale=weight, **REFERENCE)
    got = local.txt2img(Txt2ImgRequest(**REQUEST, controlnet_units=_units(ControlUnit(model=name, weight=weight))),
                        control_images=[picture])
    assert max_diff(got.images, expected) <= MAX_PIXEL_DIFF
    assert max_diff(got.images, local.txt2img(Txt2ImgRequest(**REQUEST)).images) > 10  # (the unit steers it)


def test_two_units_and_a_guidance_window_draw_multi_controlnet_pictures(default_model, controlnets, local):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    first, second = sample_picture(64, 64), sample_picture(64, 64)[::-1].copy()
    pipe = _pipe(default_model, MultiControlNetModel([_diffusers_controlnet(controlnets, CANNY),
                                                      _diffusers_controlnet(controlnets, DEPTH)]))
    window = (0.0, 0.34)  # A1111 steers steps 0-3 of 6 (its sampling step 2 is 0.33); i / steps <= 0.34 would be 0-2

    def reference(start: float, end: float) -> np.ndarray:
        return diffusers_images(pipe, image=[Image.fromarray(first), Image.fromarray(second)],
                                controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, start],
                                control_guidance_end=[1.0, end], **REFERENCE)

    units = _units(ControlUnit(model=CANNY, weight=0.7),
                   ControlUnit(model=local.spec.controlnet(DEPTH)["title"], weight=1.2, guidance_start=window[0],
                               guidance_end=window[1]))
    got = local.txt2img(Txt2ImgRequest(**REQUEST, controlnet_units=units), control_images=[first, second])
    assert max_diff(got.images, reference(*_a1111_window(*window, REQUEST["steps"]))) <= MAX_PIXEL_DIFF
    # a step more or less shows: the window is A1111's, not diffusers' own rule on the same numbers
    assert max_diff(got.images, reference(*window)) > MAX_PIXEL_DIFF


def test_a_disabled_unit_and_an_export_with_controlnets_draw_the_plain_picture(local, exported_repo):
    picture = sample_picture(64, 64)
    plain = local.txt2img(Txt2ImgRequest(**REQUEST))
    disabled = local.txt2img(Txt2ImgRequest(**REQUEST, controlnet_units=_units(ControlUnit(model=CANNY, enabled=False),
                                                                                ControlUnit(model="None", enabled=False))),
                             control_images=[picture])
    assert np.array_equal(disabled.images, plain.images)
    assert "ControlNet" not in disabled.infotexts[0]
    # the U-Net's zero residuals: the same picture as the model exported without ControlNets
    assert max_diff(plain.images, LocalPipeline(exported_repo).txt2img(Txt2ImgRequest(**REQUEST)).images) <= 1


@pytest.fixture(scope="module")
def served(repo, tmp_path_factory):
    with triton_on(repo, tmp_path_factory.mktemp("controlnet-logs")) as server:
        yield server


def test_served_units_draw_the_in_process_pictures_and_write_the_extensions_infotext(served, local):
    picture = sample_picture(64, 64)
    unit = ControlUnit(model=CANNY, weight=0.9, control_mode="ControlNet is more important")
    expected = local.txt2img(Txt2ImgRequest(**REQUEST, controlnet_units=_units(unit)), control_images=[picture])
    for url, protocol in ((served.url, "grpc"), (served.http_url, "http")):
        with Client(url, protocol=protocol) as client:
            got = client.txt2img(controlnet=[{"model": CANNY, "image": Image.fromarray(picture), "weight": 0.9,
                                              "control_mode": "ControlNet is more important"}], **REQUEST)
        assert max_diff(got.images, expected.images) <= MAX_PIXEL_DIFF
    assert got.infotexts == expected.infotexts
    title = local.spec.controlnet(CANNY)["title"]
    assert f'ControlNet 0: "Module: none, Model: {title}, Weight: 0.9' in got.infotexts[0]


def test_control_modes_scale_the_residuals_as_the_extension_does(local, controlnets):
    picture = sample_picture(64, 64)
    pictures = {}
    for mode in ("Balanced", "My prompt is more important", "ControlNet is more important"):
        units = _units(ControlUnit(model=CANNY, control_mode=mode))
        pictures[mode] = local.txt2img(Txt2ImgRequest(**REQUEST, controlnet_units=units), control_images=[picture])
    plain = local.txt2img(Txt2ImgRequest(**REQUEST)).images
    assert len({pictures[m].images.tobytes() for m in pictures}) == 3
    for mode, generation in pictures.items():
        assert max_diff(generation.images, plain) > 0, mode


@pytest.mark.parametrize("units, pictures, field", [
    ([ControlUnit(model="control_v11p_sd15_openpose")], 1, "controlnet_units[0].model"),
    ([ControlUnit(model=CANNY, weight=2.5)], 1, "controlnet_units[0].weight"),
    ([ControlUnit(model=CANNY, module="openpose")], 1, "controlnet_units[0].module"),
    ([ControlUnit(model=CANNY, guidance_start=0.8, guidance_end=0.2)], 1, "controlnet_units[0].guidance_end"),
    ([ControlUnit(model=CANNY)] * 4, 4, "controlnet_units"),
    ([ControlUnit(model=CANNY)], 0, "controlnet_image_0"),
    ([ControlUnit(model="None")], 1, "controlnet_units[0].model"),  # (enabled, without a ControlNet)
    ([ControlUnit(model=f"{CANNY} [00000000]")], 1, "controlnet_units[0].model"),  # (a wrong hash finds none)
])
def test_bad_units_are_refused_naming_the_field(local, units, pictures, field):
    with pytest.raises(InvalidRequest) as info:
        local.txt2img(Txt2ImgRequest(**REQUEST, controlnet_units=_units(*units)),
                      control_images=[sample_picture(64, 64)] * pictures)
    assert info.value.field == field


def test_a_served_bad_unit_is_a_clear_error_and_the_server_keeps_serving(served):
    with Client(served.url) as client:
        with pytest.raises(ServerRefused, match="controlnet_image_0.*an RGB uint8 picture"):  # (the job's check)
            client.txt2img(controlnet=[{"model": CANNY, "image": np.zeros((0, 64, 3), np.uint8)}], **REQUEST)
        with pytest.raises(ServerRefused, match="controlnet_image_0.*long side is at most 8x"):  # (work bounded)
            client.txt2img(controlnet=[{"model": CANNY, "image": np.zeros((8, 100, 3), np.uint8)}], **REQUEST)
        with pytest.raises(InvalidRequest, match="controlnet_units.0..model"):  # (the client's, before sending)
            client.txt2img(controlnet=[{"model": "nope", "image": np.zeros((8, 8, 3), np.uint8)}], **REQUEST)
        with pytest.raises(InvalidRequest, match="controlnet_units"):
            client.txt2img(controlnet_units="[{not json", **REQUEST)
        assert client.txt2img(**REQUEST).images.shape == (1, 64, 64, 3)


def test_export_refuses_a_controlnet_of_another_family_naming_both(default_model, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdtrt.export import export_model

    unet = UNet2DConditionModel.from_pretrained(str(default_model / "unet"), local_files_only=True)
    other = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 64))
    config = {**dict(other.config), "cross_attention_dim": 1024}  # an SD 2.x-wide text context
    foreign = ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    folder = tmp_path / "ControlNet"
    folder.mkdir()
    state = _ldm_keys(foreign.state_dict(), dict(foreign.config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "control_sd21_canny.safetensors"))
    with pytest.raises(UsageError, match=r"control_sd21_canny.safetensors \(SD 2.x ControlNet\) does not fit .*1024-wide"):
        export_model(default_model, tmp_path / "repo", progress=False, report=lambda *_: None, controlnet_dir=folder)
    (folder / "control_sd21_canny.safetensors").unlink()
    save_file({"adapter.body.0.resnets.0.block1.weight": torch.zeros(1)}, str(folder / "t2iadapter_canny.safetensors"))
    with pytest.raises(UsageError, match="t2iadapter_canny.safetensors is a T2I-Adapter"):
        export_model(default_model, tmp_path / "repo", progress=False, report=lambda *_: None, controlnet_dir=folder)


def test_tensorrt_profiles_give_each_residual_its_levels_size(local):
    from sdtrt.export.tensorrt import EngineOptions, profile_shapes

    spec = local.spec
    unet = spec.component("unet")
    for options in (EngineOptions(), EngineOptions(static_size=(72, 64))):
        shapes = profile_shapes(spec, unet, options)
        for pick in range(3):  # min, opt, max: each residual follows the sample's latent size, rounded up per level
            _, _, h, w = shapes["sample"][pick]
            for tensor in unet.inputs:
                if tensor.name.startswith(("down_block_residual", "mid_block_residual")):
                    rows, channels, rh, rw = shapes[tensor.name][pick]
                    dim = str(tensor.shape[2])
                    factor = int(dim.split("/")[1]) if "/" in dim else 1
                    assert (rh, rw) == (-(-h // factor), -(-w // factor)), tensor.name
                    assert rows == shapes["sample"][pick][0] and channels == tensor.shape[1]
        assert shapes["mid_block_residual"][0][2] < shapes["sample"][0][2]
    controlnet = spec.component(spec.controlnet(CANNY)["network"])
    assert [t.name for t in controlnet.outputs] == [t.name for t in unet.inputs if "residual" in t.name]


@pytest.fixture(scope="module")
def gateway(served, tmp_path_factory):
    """`sdtrt api` over the served model, as A1111 with sd-webui-controlnet answers (real HTTP)."""
    import subprocess
    import sys

    from servers import first_answer, free_ports

    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "api", "--url", served.url, "--port", str(port),
                             "--out", str(tmp_path_factory.mktemp("controlnet-outputs"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert first_answer(f"http://127.0.0.1:{port}/controlnet/version", proc) == 200
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(30)


def test_webuiapis_controlnet_units_draw_the_served_picture(gateway, local):
    webuiapi = pytest.importorskip("webuiapi")

    host, port = gateway.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    picture = Image.fromarray(sample_picture(64, 64))
    title = local.spec.controlnet(CANNY)["title"]
    units = [webuiapi.ControlNetUnit(image=picture, model=title, weight=0.8, resize_mode="Just Resize"),
             webuiapi.ControlNetUnit(image=picture, model=DEPTH, enabled=False)]
    result = api.txt2img(prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], seed=REQUEST["seed"],
                         steps=REQUEST["steps"], cfg_scale=REQUEST["guidance_scale"], width=64, height=64,
                         sampler_name="Euler", controlnet_units=units,
                         alwayson_scripts={})  # (webuiapi writes the units into its default dict otherwise)
    unit = ControlUnit(model=CANNY, weight=0.8, resize_mode="Just Resize", processor_res=512, threshold_a=64,
                       threshold_b=64)
    # (the gateway runs A1111's own code paths: k-diffusion's Euler)
    expected = local.txt2img(Txt2ImgRequest(**REQUEST, k_diffusion=True, controlnet_units=_units(unit)),
                             control_images=[np.asarray(picture)])
    assert result.info["infotexts"][0] == expected.infotexts[0]
    assert max_diff(np.asarray(result.image.convert("RGB"))[None], expected.images) <= MAX_PIXEL_DIFF
    assert f'ControlNet 0: "Module: none, Model: {title}, Weight: 0.8, Resize Mode: Just Resize' in \
        result.info["infotexts"][0]


def test_the_extensions_routes_list_and_detect(gateway, local):
    import base64
    import io

    import cv2
    import httpx

    with httpx.Client(base_url=gateway, timeout=60) as http:
        assert http.get("/controlnet/version").json() == {"version": 3}
        assert http.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
        models = http.get("/controlnet/model_list", params={"update": True}).json()["model_list"]
        assert models[0] == "None" and set(models[1:]) == {e["title"] for e in local.spec.controlnets.values()}
        modules = http.get("/controlnet/module_list").json()
        assert {"none", "canny", "invert"} <= set(modules["module_list"])
        assert modules["module_detail"]["canny"]["sliders"][1]["value"] == 100
        picture = sample_picture(96, 64)
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        sent = base64.b64encode(buffer.getvalue()).decode()
        answer = http.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [sent],
                                                       "controlnet_processor_res": 64, "controlnet_threshold_a": 50,
                                                       "controlnet_threshold_b": 150}).json()
        edges = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))
        # the extension's canny: OpenCV's on the picture at the processor resolution (its short side)
        assert np.array_equal(edges[..., 0], cv2.Canny(picture, 50, 150)) and answer["info"] == "Success"
        refused = http.post("/controlnet/detect", json={"controlnet_module": "openpose",
                                                        "controlnet_input_images": [sent]})
        assert refused.status_code == 422 and "openpose" in refused.text
        bad = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                   "alwayson_scripts": {"ControlNet": {"args": [
                                                       {"enabled": True, "model": "control_nope", "image": sent}]}}})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "alwayson_scripts.controlnet.args.0.model"]


def test_the_cli_takes_controlnet_units_locally_and_served(repo, served, local, tmp_path):
    from sdtrt.client.apps.cli import main as cli

    picture = sample_picture(64, 64)
    png = tmp_path / "edges.png"
    Image.fromarray(picture).save(png)
    unit = ControlUnit(model=CANNY, weight=0.8, guidance_end=0.6, control_mode="My prompt is more important")
    expected = local.txt2img(Txt2ImgRequest(**REQUEST, controlnet_units=_units(unit)), control_images=[picture])
    flags = ["txt2img", REQUEST["prompt"], "--negative-prompt", REQUEST["negative_prompt"], "--sampler", "Euler",
             "--steps", "6", "--seed", "11", "--width", "64", "--height", "64", "--cfg-scale", "7",
             "--controlnet", f"{CANNY}:{png}:0.8,guidance_end=0.6,control_mode=My prompt is more important"]
    for where, folder in ((["--local", str(repo)], "local"), (["--url", served.url], "served")):
        assert cli([*flags, *where, "--out", str(tmp_path / folder)]) == 0
        with Image.open(tmp_path / folder / "00001-11.png") as im:
            assert max_diff(np.asarray(im.convert("RGB"))[None], expected.images) <= MAX_PIXEL_DIFF
            assert "Guidance End: 0.6" in im.info["parameters"]
    assert cli([*flags[:-1], f"{CANNY}", "--local", str(repo), "--out", str(tmp_path)]) == 2  # no picture: said


@pytest.mark.skipif(__import__("servers").CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_pages_controlnet_panel_steers_its_picture(served, local, tmp_path):
    import subprocess
    import sys

    from playwright.sync_api import sync_playwright

    from servers import CHROMIUM, first_answer, free_ports
    from sdtrt.requests.generation import settings_from_infotext

    picture = sample_picture(64, 64)
    Image.fromarray(picture).save(tmp_path / "control.png")
    (port,) = free_ports(1)
    out = tmp_path / "outputs"
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "ui", "--url", served.url, "--port", str(port),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert first_answer(f"http://127.0.0.1:{port}/", proc) == 200
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            tab = page.locator("#tab_txt2img")
            tab.wait_for(timeout=60000)
            tab.get_by_label("Prompt", exact=True).fill(REQUEST["prompt"])
            for label, value in (("Sampling steps", 4), ("Width", 64), ("Height", 64)):
                box = tab.get_by_label(f"number input for {label}")
                box.fill(str(value))
                box.press("Enter")
            tab.get_by_label("Seed", exact=True).fill("5")
            page.locator("#txt2img_controlnet").get_by_text("ControlNet").first.click()
            page.locator("#txt2img_controlnet_enable input").check()
            page.locator("#txt2img_controlnet_image input[type=file]").set_input_files(str(tmp_path / "control.png"))
            page.locator("#txt2img_controlnet_image img").first.wait_for(timeout=30000)
            page.locator("#txt2img_generate").click()
            page.wait_for_function("() => (document.querySelector('#txt2img_progress')?.innerText || '')"
                                   ".includes('Done')", timeout=120000)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    (saved,) = (out / "txt2img-images").iterdir()
    with Image.open(saved) as im:
        shown, text = np.asarray(im.convert("RGB")), im.info["parameters"]
    assert 'ControlNet 0: "Module: none, Model: ' in text
    settings = settings_from_infotext(text)
    model = text.split("Model: ")[2].split(",")[0]
    fields = {k: v for k, v in settings.items() if k in Txt2ImgRequest.__dataclass_fields__}
    unit = ControlUnit(model=model)
    expected = local.txt2img(Txt2ImgRequest(**{**fields, "controlnet_units": _units(unit)}), control_images=[picture])
    assert max_diff(shown[None], expected.images) <= MAX_PIXEL_DIFF
    assert model in {entry["title"] for entry in local.spec.controlnets.values()}  # (the panel's first model)
    assert max_diff(shown[None], local.txt2img(Txt2ImgRequest(**fields)).images) > 3  # (and the unit steered it)


# --- the preprocessors and the resize modes, against the extension's code restated with OpenCV -------------------

def _ext_pad(img, res):
    """The extension's resize_image_with_pad, restated: short side to res (cubic up, area down), edge-padded to 64s."""
    import cv2

    h, w = img.shape[:2]
    k = res / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    out = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad = lambda n: int(np.ceil(n / 64) * 64 - n)  # noqa: E731
    return np.pad(out, [[0, pad(th)], [0, pad(tw)], [0, 0]], mode="edge"), (th, tw)


def _ext_reference(module, img, res, a):
    import cv2

    padded, (th, tw) = _ext_pad(img, res)
    crop = lambda x: x[:th, :tw]  # noqa: E731
    if module == "canny":
        return np.stack([crop(cv2.Canny(padded, 100, 200))] * 3, axis=2)
    if module == "invert":
        return 255 - img
    if module == "threshold":
        return np.stack([crop(np.where(padded.min(axis=2) > a, 255, 0).astype(np.uint8))] * 3, axis=2)
    if module == "blur_gaussian":
        return cv2.GaussianBlur(crop(padded), (0, 0), a)
    if module == "scribble_xdog":
        f = padded.astype(np.float32)
        dog = (255 - np.min(cv2.GaussianBlur(f, (0, 0), 5.0) - cv2.GaussianBlur(f, (0, 0), 0.5), axis=2))
        dog = dog.clip(0, 255).astype(np.uint8)
        return crop(np.where((2 * (255 - dog) > a)[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2))
    if module == "tile_resample":
        return cv2.resize(img, (int(img.shape[1] / a), int(img.shape[0] / a)), interpolation=cv2.INTER_AREA)
    if module == "lineart_standard":
        f = padded.astype(np.float32)
        v = np.min(cv2.GaussianBlur(f, (0, 0), 6.0) - f, axis=2).clip(0, 255)
        v /= max(16, np.median(v[v > 8]))
        return np.stack([crop((v * 127).clip(0, 255).astype(np.uint8))] * 3, axis=2)
    raise AssertionError(module)


@pytest.mark.parametrize("module, res, a", [("canny", 96, -1), ("invert", 512, -1), ("threshold", 80, 100),
                                            ("blur_gaussian", 72, 3.0), ("scribble_xdog", 128, 20),
                                            ("tile_resample", 512, 2.5), ("lineart_standard", 100, -1)])
def test_each_preprocessor_makes_the_extensions_map(module, res, a):
    from sdtrt.requests.preprocessors import preprocess

    picture = sample_picture(120, 80)
    unit = ControlUnit(model=CANNY, module=module, processor_res=res, threshold_a=a)
    got = preprocess(unit, picture, None, (64, 64))
    expected = _ext_reference(module, picture, res, a if a != -1 else None)
    assert got.dtype == np.uint8 and got.shape == expected.shape and np.array_equal(got, expected), module


def test_pixel_perfect_reads_the_resolution_from_the_generations_size():
    from sdtrt.requests.preprocessors import pixel_perfect_resolution, preprocess

    picture = sample_picture(120, 80)  # 120 x 80 to 64 x 96: covering scales by 1.2, fitting by 0.533
    assert pixel_perfect_resolution(picture, 64, 96, "Crop and Resize") == 96
    assert pixel_perfect_resolution(picture, 64, 96, "Resize and Fill") == 43
    unit = ControlUnit(model=CANNY, module="canny", pixel_perfect=True, processor_res=512)
    assert preprocess(unit, picture, None, (64, 96)).shape[:2] == (96, 144)


def _ext_resize(x, w, h, mode):
    """The extension's detectmap_proc for maps of many colours or a few (not its binary-edge path), restated."""
    import cv2

    def hq(m, size):
        if m.shape[:2] == (size[1], size[0]):
            return m
        colours = len(np.unique(m.reshape(-1, 3), axis=0))
        smaller = size[0] * size[1] < m.shape[0] * m.shape[1]
        how = cv2.INTER_NEAREST if 2 < colours < 200 else cv2.INTER_AREA if smaller else cv2.INTER_CUBIC
        return cv2.resize(m, size, interpolation=how)

    if mode == "Just Resize":
        return hq(x, (w, h))
    k0, k1 = h / x.shape[0], w / x.shape[1]
    if mode == "Resize and Fill":
        k = min(k0, k1)
        border = np.median(np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]]), axis=0).astype(np.uint8)
        out = np.tile(border[None, None], [h, w, 1])
        m = hq(x, (int(np.round(x.shape[1] * k)), int(np.round(x.shape[0] * k))))
        top, left = max(0, (h - m.shape[0]) // 2), max(0, (w - m.shape[1]) // 2)
        out[top:top + m.shape[0], left:left + m.shape[1]] = m
        return out
    k = max(k0, k1)
    m = hq(x, (int(np.round(x.shape[1] * k)), int(np.round(x.shape[0] * k))))
    top, left = max(0, (m.shape[0] - h) // 2), max(0, (m.shape[1] - w) // 2)
    return m[top:top + h, left:left + w]


@pytest.mark.parametrize("mode", ["Just Resize", "Crop and Resize", "Resize and Fill"])
def test_resize_modes_fit_the_map_as_the_extension_does(mode):
    from sdtrt.requests.preprocessors import resize_map

    smooth = sample_picture(120, 80)
    few = (smooth // 86 * 86).astype(np.uint8)  # a segmentation-like map: 27 colours at the most
    for picture, (w, h) in ((smooth, (64, 96)), (smooth, (240, 160)), (few, (96, 64))):
        assert np.array_equal(resize_map(picture, w, h, mode), _ext_resize(picture, w, h, mode)), (mode, w, h)


def test_binary_edges_stay_thin_and_binary_when_resized():
    import cv2

    from sdtrt.requests.preprocessors import resize_map

    edges = np.stack([cv2.Canny(sample_picture(120, 80), 100, 200)] * 3, axis=2)
    for w, h in ((240, 160), (60, 40)):
        out = resize_map(edges, w, h, "Just Resize")
        assert out.shape == (h, w, 3) and set(np.unique(out)) <= {0, 255}
        opened = cv2.dilate(cv2.erode(out, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
        assert (opened < out).sum() * 2 > (out > 127).sum()  # still one pixel wide, as the extension keeps them


def test_sdxl_controlnet_in_diffusers_layout_draws_diffusers_sdxl_controlnet_picture(controlnets, tmp_path_factory):
    """An SDXL ControlNet as civitai holds them (diffusers' layout in one file), against diffusers' SDXL ControlNet
    pipeline; an SD 1.x ControlNet given to the SDXL model is refused naming both."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from sdtrt.export import export_model
    from sdtrt.pipeline.default_model import build_default_model

    model = build_default_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")
    base = StableDiffusionXLPipeline.from_pretrained(str(model), local_files_only=True, dtype=torch.float32)
    controlnet = _controlnet(base.unet, 4)
    folder = tmp_path_factory.mktemp("ControlNet-XL")
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()},
              str(folder / "diffusers_xl_canny_mid.safetensors"))
    repo = tmp_path_factory.mktemp("controlnet-xl") / "repo"
    export_model(model, repo, progress=False, report=lambda *_: None, controlnet_dir=folder)
    parts = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    reference = ControlNetModel.from_config(controlnet.config)  # (the file's weights, read by safetensors)
    reference.load_state_dict(load_file(str(folder / "diffusers_xl_canny_mid.safetensors")))
    pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in base.components.items() if k in parts},
                                               controlnet=reference.eval())
    pipe.set_progress_bar_config(disable=True)
    picture = sample_picture(64, 64)
    expected = diffusers_images(pipe, image=Image.fromarray(picture), controlnet_conditioning_scale=0.9, **REFERENCE)
    got = LocalPipeline(repo).txt2img(Txt2ImgRequest(**REQUEST, controlnet_units=_units(
        ControlUnit(model="diffusers_xl_canny_mid", weight=0.9))), control_images=[picture])
    assert max_diff(got.images, expected) <= MAX_PIXEL_DIFF
    with pytest.raises(UsageError, match=rf"{DEPTH} \(32-wide text context ControlNet\) does not fit .*text_time"):
        export_model(model, tmp_path_factory.mktemp("refused") / "repo", progress=False, report=lambda *_: None,
                     controlnet_dir=controlnets[0])


def test_img2img_with_a_unit_draws_diffusers_controlnet_img2img_picture(default_model, controlnets, local):
    """img2img: the unit steers the steps the strength leaves (its window over them), with diffusers'
    StableDiffusionControlNetImg2ImgPipeline as the reference; a unit without a picture takes the init image."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from reference import _run_per_image
    from sdtrt.requests.request import Img2ImgRequest

    init, control = sample_picture(64, 64), sample_picture(64, 64)[:, ::-1].copy()
    parts = _pipe(default_model, _diffusers_controlnet(controlnets, CANNY)).components
    pipe = StableDiffusionControlNetImg2ImgPipeline(**parts)

    def reference(picture):
        def call(generator, _):
            out = pipe(REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"], image=Image.fromarray(init),
                       control_image=Image.fromarray(picture), strength=0.6, num_inference_steps=REQUEST["steps"],
                       guidance_scale=REQUEST["guidance_scale"], controlnet_conditioning_scale=0.9,
                       generator=generator, output_type="np").images[0]
            return (out * 255).round().astype(np.uint8)

        return _run_per_image(pipe, REQUEST["sampler"], REQUEST["seed"], 1, call)

    request = Img2ImgRequest(**REQUEST, denoising_strength=0.6,
                             controlnet_units=_units(ControlUnit(model=CANNY, weight=0.9)))
    got = local.img2img(request, init, control_images=[control])
    assert max_diff(got.images, reference(control)) <= MAX_PIXEL_DIFF
    assert max_diff(local.img2img(request, init).images, reference(init)) <= MAX_PIXEL_DIFF


def test_the_extensions_bound_check_soft_scales_and_hr_option():
    from sdtrt.requests.controlnet import PlannedUnit
    from sdtrt.requests.preprocessors import bounded

    canny = bounded(ControlUnit(model=CANNY, module="canny", processor_res=-1, threshold_a=300, threshold_b=50))
    assert (canny.processor_res, canny.threshold_a, canny.threshold_b) == (512, 100, 50)  # out of range: defaults
    none = bounded(ControlUnit(model=CANNY))
    assert (none.processor_res, none.threshold_a, none.threshold_b) == (512, 0.5, 0.5)  # (its hidden sliders)
    soft = PlannedUnit(ControlUnit(model=CANNY, weight=0.5, control_mode="My prompt is more important"), "", "",
                       np.zeros((8, 8, 3), np.uint8))
    assert soft.scales(13)[-1] == 0.5 and soft.scales(10)[-1] == pytest.approx(0.5 * 0.825 ** 3)  # SDXL's 10
    low = PlannedUnit(ControlUnit(model=CANNY, hr_option="Low res only"), "", "", np.zeros((8, 8, 3), np.uint8))
    assert low.steers(None) and low.steers(False) and not low.steers(True)
