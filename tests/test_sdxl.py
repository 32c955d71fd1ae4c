"""SDXL through the same export, networks, loop and server: a tiny SDXL-shaped model built offline (two text
encoders, the U-Net's added conditions), checked against diffusers' own StableDiffusionXLPipeline on the same
weights, seeds and settings, in-process and served."""

from __future__ import annotations

import pytest

from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff
from servers import CHROMIUM, free_ports, page_generates
from sdtrt.requests.request import Txt2ImgRequest

SAMPLERS = ("Euler a", "Euler", "DPM++ 2M Karras")
SETTINGS = dict(prompt="a red barn in (snow:1.2)", negative_prompt="blurry", steps=6, seed=3, width=64, height=64)


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from sdtrt.pipeline.default_model import build_default_model

    return build_default_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="module")
def sdxl_repo(sdxl_model, tmp_path_factory):
    """The folder, and the same model as an original-layout single file ("tiny-xl"), in one repository."""
    from sdtrt.export import export_model
    from sdtrt.export.networks.ldm import to_single_file

    out = tmp_path_factory.mktemp("repos") / "sdxl"
    export_model(sdxl_model, out, progress=False, report=lambda *_: None)
    single = to_single_file(sdxl_model, tmp_path_factory.mktemp("files") / "tiny-xl.safetensors")
    export_model(single, out, progress=False, report=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_model):
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def expected(sdxl_pipe):
    """diffusers' pictures. The prompt's (snow:1.2) is A1111 weighting, which diffusers does not parse: the reference
    gets the prompt without it at weight 1, and sdtrt the same for the comparison (weighting is tested on SD 1.x)."""
    return {sampler: diffusers_images(sdxl_pipe, prompt="a red barn in snow", negative_prompt="blurry", sampler=sampler,
                                      steps=6, cfg=7.0, seed=3, width=64, height=64) for sampler in SAMPLERS}


def request(sampler: str) -> Txt2ImgRequest:
    return Txt2ImgRequest(**{**SETTINGS, "prompt": "a red barn in snow"}, sampler=sampler, guidance_scale=7.0)


def test_spec_describes_sdxl(sdxl_repo):
    from sdtrt.contract.spec import load_spec

    spec = load_spec(sdxl_repo)
    unet, text = spec.component("unet"), spec.component("text_encoder")
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [t.name for t in text.outputs] == ["text_embeddings", "pooled_embeddings"]
    assert unet.input("encoder_hidden_states").shape[2] == 32 + 64 == spec.text_hidden_size  # both encoders' widths
    assert spec.field("width").default == spec.field("height").default == 1024  # A1111's SDXL default
    assert spec.vae_scaling_factor == 0.13025


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_in_process_matches_diffusers_sdxl(sdxl_repo, expected, sampler):
    from sdtrt.pipeline.local import LocalPipeline

    images = LocalPipeline(sdxl_repo).txt2img(request(sampler)).images
    assert max_diff(images, expected[sampler]) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("skip", [1])  # (the tiny encoders have two layers: Clip skip 1 is all they allow)
def test_clip_skip_as_diffusers_and_as_a1111s_clip_l_skip(sdxl_repo, sdxl_pipe, skip):
    """clip_skip n: both encoders n - 1 below the penultimate layer (diffusers' encode_prompt clip_skip n - 1);
    with sdxl_clip_l_skip, A1111's: CLIP-L at hidden_states[-n], OpenCLIP-G at its penultimate layer."""
    import torch

    from sdtrt.pipeline.local import LocalPipeline

    local, prompt = LocalPipeline(sdxl_repo), "a red barn"
    ours = local.encode_prompts(Txt2ImgRequest(prompt=prompt, clip_skip=skip))[1]["encoder_hidden_states"]
    with torch.no_grad():
        expected = sdxl_pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False,
                                           clip_skip=skip - 1 if skip > 1 else None)[0]
        assert torch.abs(ours - expected).max() < 1e-4
        a1111 = local.encode_prompts(Txt2ImgRequest(prompt=prompt, clip_skip=skip, sdxl_clip_l_skip=True))
        ids = [torch.tensor([t(prompt, padding="max_length", max_length=77).input_ids])
               for t in (sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2)]
        first = sdxl_pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states[-skip]
        second = sdxl_pipe.text_encoder_2(ids[1], output_hidden_states=True).hidden_states[-2]
    assert torch.abs(a1111[1]["encoder_hidden_states"] - torch.cat([first, second], dim=-1)).max() < 1e-4
    assert torch.abs(a1111[1]["encoder_hidden_states"] - expected).max() > 1e-3  # CLIP-L read elsewhere


def test_the_crop_coordinates_reach_the_time_ids_as_diffusers_makes_them(sdxl_repo, sdxl_pipe, monkeypatch):
    """A1111's sdxl_crop_top / sdxl_crop_left are SDXL's crop conditioning: the U-Net gets the time ids diffusers'
    pipeline makes for crops_coords_top_left (the tiny model's picture barely shows them)."""
    import torch

    from sdtrt.pipeline.local import LocalNetworks, LocalPipeline

    seen = []
    unet = LocalNetworks.unet

    def recording(self, sample, timestep, context):
        seen.append(context["time_ids"])
        return unet(self, sample, timestep, context)

    monkeypatch.setattr(LocalNetworks, "unet", recording)
    LocalPipeline(sdxl_repo).txt2img(Txt2ImgRequest(**{**SETTINGS, "steps": 2}, sampler="Euler", guidance_scale=7.0,
                                                    sdxl_crop_top=48, sdxl_crop_left=16))
    expected = sdxl_pipe._get_add_time_ids((64, 64), (48, 16), (64, 64), dtype=torch.float32,
                                           text_encoder_projection_dim=sdxl_pipe.text_encoder_2.config.projection_dim)
    assert seen and all(torch.equal(ids, expected.repeat(len(ids), 1)) for ids in seen)


@pytest.mark.slow  # a second server on the SDXL export; in-process SDXL parity stays in the default suite
def test_served_matches_diffusers_sdxl(sdxl_repo, expected, tmp_path):
    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.client import Client

    http, grpc, metrics = free_ports(3)
    with TritonServer(sdxl_repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "log") as triton:
        client = Client(triton.url)
        for sampler in SAMPLERS:
            fields = request(sampler).as_dict()
            served = client.txt2img(fields.pop("prompt"), **{k: v for k, v in fields.items() if v is not None})
            assert max_diff(served.images, expected[sampler]) <= MAX_PIXEL_DIFF, sampler
        # A1111 weighting on both encoders, a 2-chunk prompt with BREAK: served = in-process.
        from sdtrt.pipeline.local import LocalPipeline
        from sdtrt.requests.request import Img2ImgRequest
        from reference import sample_mask, sample_picture

        local = LocalPipeline(sdxl_repo)
        weighted = dict(SETTINGS, prompt="a red barn in (snow:1.4) BREAK [fog], at dusk")
        served = client.txt2img(weighted.pop("prompt"), **weighted)
        assert max_diff(served.images, local.txt2img(Txt2ImgRequest(prompt="a red barn in (snow:1.4) BREAK [fog], "
                                                                    "at dusk", **weighted)).images) <= MAX_PIXEL_DIFF
        assert "Model: tiny-sdxl" in served.infotexts[0]

        # The hires fix and img2img take the same loop (time ids at each pass's size): served = in-process.
        hires = dict(steps=4, seed=5, width=64, height=64, enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
        assert max_diff(client.txt2img("a lighthouse", **hires).images,
                        local.txt2img(Txt2ImgRequest(prompt="a lighthouse", **hires)).images) <= MAX_PIXEL_DIFF
        picture = sample_picture(64, 64)
        settings = dict(steps=6, seed=4, denoising_strength=0.6, width=64, height=64)
        assert max_diff(client.img2img("a lighthouse", picture, **settings).images,
                        local.img2img(Img2ImgRequest(prompt="a lighthouse", **settings), picture).images) <= MAX_PIXEL_DIFF
        mask = sample_mask(64, 64)  # inpainting (a 4-channel U-Net: blended each step)
        assert max_diff(client.img2img("a lighthouse", picture, mask, **settings).images,
                        local.img2img(Img2ImgRequest(prompt="a lighthouse", **settings), picture, mask).images
                        ) <= MAX_PIXEL_DIFF

        # The single file's export serves beside the folder's, as the same pictures (same weights, fp32 file).
        from_file = client.txt2img("a red barn in snow", model="tiny-xl", sampler="Euler a", guidance_scale=7.0,
                                   **{k: v for k, v in SETTINGS.items() if k not in ("prompt",)})
        assert max_diff(from_file.images, expected["Euler a"]) <= MAX_PIXEL_DIFF
        assert "Model: tiny-xl" in from_file.infotexts[0]

        # The A1111 gateway serves it as it serves any model.
        from fastapi.testclient import TestClient

        from sdtrt.client.apps.a1111_api import create_app

        api = TestClient(create_app(client, tmp_path / "outputs"))
        assert [m["model_name"] for m in api.get("/sdapi/v1/sd-models").json()] == ["tiny-sdxl", "tiny-xl"]
        answer = api.post("/sdapi/v1/txt2img", json={"prompt": "a red barn", "steps": 3, "width": 64, "height": 64,
                                                     "seed": 1})
        assert answer.status_code == 200 and len(answer.json()["images"]) == 1
        refiner = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "refiner_checkpoint": "refiner",
                                                      "refiner_switch_at": 0.8})
        assert refiner.status_code == 422 and "refiner_checkpoint" in refiner.text

        # ... and so does the page (its sliders from the SDXL spec: 1024 px default, up to 1536).
        if CHROMIUM is not None:
            page_generates(triton.url, tmp_path / "page", shot=False)


def test_img2img_matches_diffusers_sdxl(sdxl_repo, sdxl_pipe):
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from reference import reference_scheduler, sample_picture
    from sdtrt.pipeline.local import LocalPipeline
    from sdtrt.requests.request import Img2ImgRequest

    picture = sample_picture(64, 64)
    pipe = StableDiffusionXLImg2ImgPipeline(**sdxl_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = reference_scheduler("Euler", sdxl_pipe.scheduler.config, 4)
    expected = pipe("a lighthouse", negative_prompt="", image=Image.fromarray(picture), strength=0.6,
                    num_inference_steps=8, guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(4),
                    output_type="np").images
    expected = (expected * 255).round().astype(np.uint8)
    mine = LocalPipeline(sdxl_repo).img2img(Img2ImgRequest(prompt="a lighthouse", sampler="Euler", steps=8, seed=4,
                                                           guidance_scale=7.0, denoising_strength=0.6, width=64,
                                                           height=64), picture).images
    assert max_diff(mine, expected) <= MAX_PIXEL_DIFF


def test_an_sdxl_refiner_is_refused_by_name(sdxl_model, tmp_path):
    import json
    import shutil

    from sdtrt.contract.errors import UsageError
    from sdtrt.export import export_model

    refiner = tmp_path / "refiner"
    shutil.copytree(sdxl_model, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(UsageError, match="is an SDXL refiner: sdtrt does not serve A1111's Refiner"):
        export_model(refiner, tmp_path / "repo", progress=False, report=lambda *_: None)


@pytest.mark.slow  # a second SDXL export, from a single file
def test_sdxl_single_file_exports_and_matches_diffusers(sdxl_model, sdxl_pipe, tmp_path):
    """An SDXL checkpoint in the original (A1111/civitai) layout, fp16, with no config folder: its architecture is
    read from its weights (both encoders, transformer depths, the added conditions' widths), offline."""
    import copy

    from sdtrt.export import export_model
    from sdtrt.export.networks.ldm import to_single_file
    from sdtrt.pipeline.local import LocalPipeline

    path = to_single_file(sdxl_model, tmp_path / "tiny-xl.safetensors", dtype="float16")
    lines: list[str] = []
    spec = export_model(path, tmp_path / "repo", progress=False, report=lines.append)
    assert "tiny-xl.safetensors: SDXL, epsilon, 1024x1024 native (read from its weights)" in lines
    assert spec.model_name == "tiny-xl" and spec.component("unet").input("time_ids").shape == ("unet_batch", 6)
    pipe = copy.deepcopy(sdxl_pipe)  # the reference gets the file's fp16-rounded weights
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        for p in module.parameters():
            p.data = p.data.half().float()
    expected = diffusers_images(pipe, prompt="a red barn", negative_prompt="blurry", sampler="Euler", steps=6, cfg=7.0,
                                seed=3, width=64, height=64)
    got = LocalPipeline(tmp_path / "repo").txt2img(Txt2ImgRequest(prompt="a red barn", negative_prompt="blurry",
                                                                  sampler="Euler", steps=6, guidance_scale=7.0, seed=3,
                                                                  width=64, height=64))
    assert max_diff(got.images, expected) <= MAX_PIXEL_DIFF


def test_sdxl_tensorrt_profiles_and_precision(sdxl_repo, tmp_path):
    """What a GPU build gets, checked on the CPU: the U-Net's profile carries the added conditions, the usual SDXL
    aspect buckets are inside it, and the VAE (which overflows in FP16) is built in FP32 unless it is fp16-fixed."""
    from dataclasses import replace

    from sdtrt.export.tensorrt import EngineOptions, engine_fp16, profile_shapes
    from sdtrt.contract.spec import load_spec

    spec = load_spec(sdxl_repo)
    shapes = profile_shapes(spec, spec.component("unet"), EngineOptions())
    assert shapes["time_ids"] == [(1, 6), (2, 6), (spec.dims["unet_batch"].max, 6)]
    assert shapes["text_embeds"][1] == (2, 32) and shapes["sample"][1] == (2, 4, 128, 128)  # 1024x1024 optimum
    lo, hi = shapes["sample"][0][2:], shapes["sample"][2][2:]
    for width, height in ((1024, 1024), (1152, 896), (1216, 832), (1344, 768), (832, 1216)):
        assert lo[0] * 8 <= height <= hi[0] * 8 and lo[1] * 8 <= width <= hi[1] * 8, (width, height)
    assert spec.extra["vae_fp32"] and not engine_fp16(spec, "vae_decoder", EngineOptions())
    assert engine_fp16(spec, "unet", EngineOptions()) and not engine_fp16(spec, "unet", EngineOptions(fp32=("unet",)))
    fixed = replace(spec, extra={k: v for k, v in spec.extra.items() if k != "vae_fp32"})
    assert engine_fp16(fixed, "vae_decoder", EngineOptions())


def test_full_size_sdxl_unet_has_sdxl_base_parameter_count():
    """SDXL base's U-Net at its real shapes, built on the meta device (no memory, no weights): 2.6 B parameters."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdtrt.pipeline.default_model import SDXL_UNET_SHAPES

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_SHAPES)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
