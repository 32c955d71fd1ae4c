"""A1111's "SD VAE" per request: VAE files registered at export (``--vaes DIR``), each served as its own encoder
and decoder, picked by file name in the request (``vae``) or A1111's sd_vae option. The reference is diffusers'
pipeline with the VAE file loaded by diffusers itself (``AutoencoderKL.from_single_file``) in place of the
checkpoint's; the files are random VAEs of the default model's architecture, in the original (LDM) layout as
A1111's models/VAE holds them: a .safetensors and a weights-only .pt."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff, sample_picture
from servers import triton_on
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.errors import InvalidRequest, UsageError
from sdtrt.pipeline.local import LocalPipeline
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest

REQUEST = dict(prompt="a castle on a hill", negative_prompt="fog", sampler="Euler a", steps=5, seed=3, width=64,
               height=64)


@pytest.fixture(scope="module")
def vae_folder(default_model, tmp_path_factory):
    """Two VAEs of the default model's architecture (other weights) in LDM layout: A1111's models/VAE."""
    from diffusers import AutoencoderKL

    from sdtrt.export.networks.ldm import VAE, vae_to_ldm

    folder = tmp_path_factory.mktemp("VAE")
    base = AutoencoderKL.from_pretrained(str(default_model / "vae"), local_files_only=True)
    for seed, name in ((21, "soft-vae.safetensors"), (22, "old-vae.pt")):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(base.config).eval()
        ldm = {k[len(VAE):]: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()}
        if name.endswith(".pt"):  # as A1111-era .pt VAEs hold it: a state dict under "state_dict"
            torch.save({"state_dict": ldm}, str(folder / name))
        else:
            save_file(ldm, str(folder / name))
    return folder


@pytest.fixture(scope="module")
def repo(default_model, vae_folder, tmp_path_factory):
    """The default model exported with `sdtrt export --vaes DIR` (the .pt read weights-only: no --allow-pickle)."""
    from sdtrt.client.apps.cli import main as cli

    out = tmp_path_factory.mktemp("vae-repo") / "repo"
    # (on onnxruntime, the pictures' reference, as the library's exports: `auto`'s first-start timing is
    # tests/test_runners.py's to check)
    assert cli(["export", str(default_model), "--out", str(out), "--vaes", str(vae_folder),
                "--cpu-engine", "onnxruntime"]) == 0
    return out


@pytest.fixture(scope="module")
def local(repo):
    return LocalPipeline(repo)


def reference_pipe(default_model, vae_file):
    """diffusers' pipeline on the same weights, with diffusers' own loading of the VAE file."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, safety_checker=None)
    if vae_file.suffix == ".pt":  # (diffusers reads .safetensors single files offline; the same weights)
        single = vae_file.with_suffix(".for-diffusers.safetensors")
        save_file(torch.load(str(vae_file), weights_only=True)["state_dict"], str(single))
        vae_file = single
    pipe.vae = AutoencoderKL.from_single_file(str(vae_file), config=str(default_model / "vae"),
                                              local_files_only=True, torch_dtype=torch.float32).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["soft-vae.safetensors", "old-vae.pt"])
def test_a_registered_vae_decodes_the_requests_picture_as_diffusers_with_that_file(name, local, default_model,
                                                                                   vae_folder):
    result = local.txt2img(Txt2ImgRequest(**REQUEST, vae=name))
    expected = diffusers_images(reference_pipe(default_model, vae_folder / name), cfg=7.0, **{
        k: v for k, v in REQUEST.items()})
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    own = local.txt2img(Txt2ImgRequest(**REQUEST))
    assert max_diff(own.images, expected) > MAX_PIXEL_DIFF  # the VAE shows in the picture
    digest = hashlib.sha256((vae_folder / name).read_bytes()).hexdigest()
    assert f"VAE hash: {digest[:10]}, VAE: {name}," in result.infotexts[0]
    assert "VAE" not in own.infotexts[0]
    by_stem = local.txt2img(Txt2ImgRequest(**REQUEST, vae=name.rsplit(".", 1)[0]))
    assert (by_stem.images == result.images).all()


def test_img2img_encodes_with_the_requests_vae(local, default_model, vae_folder):
    """diffusers' img2img pipeline with that VAE: it encodes the picture and decodes the result."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from reference import reference_scheduler

    picture = sample_picture(64, 64)
    pipe = StableDiffusionImg2ImgPipeline(**reference_pipe(default_model, vae_folder / "soft-vae.safetensors").components)
    pipe.scheduler = reference_scheduler("Euler", pipe.scheduler.config, 3)
    expected = pipe(REQUEST["prompt"], image=Image.fromarray(picture), strength=0.6, num_inference_steps=10,
                    guidance_scale=7.0, negative_prompt=REQUEST["negative_prompt"], output_type="np",
                    generator=torch.Generator().manual_seed(3)).images
    request = Img2ImgRequest(**{**REQUEST, "sampler": "Euler", "steps": 10}, denoising_strength=0.6,
                             vae="soft-vae.safetensors")
    result = local.img2img(request, picture)
    assert max_diff(result.images, (expected * 255).round().astype(np.uint8)) <= MAX_PIXEL_DIFF


def test_an_unknown_vae_or_one_with_tiling_is_refused_naming_the_field(local):
    with pytest.raises(InvalidRequest) as exc:
        local.txt2img(Txt2ImgRequest(**REQUEST, vae="vae-ft-mse-840000-ema-pruned.safetensors"))
    assert exc.value.field == "vae" and "'soft-vae.safetensors'" in str(exc.value) and "--vaes" in str(exc.value)
    for own in ("", "Automatic", "None"):
        assert (local.txt2img(Txt2ImgRequest(**REQUEST, vae=own)).images
                == local.txt2img(Txt2ImgRequest(**REQUEST)).images).all()


def test_a_vae_of_another_architecture_in_the_folder_is_refused_at_export(default_model, tmp_path):
    from sdtrt.export import export_model

    folder = tmp_path / "VAE"
    folder.mkdir()
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(8, 3, 3, 3)}, str(folder / "wrong.safetensors"))
    with pytest.raises(UsageError, match="wrong.safetensors does not fit this checkpoint's VAE"):
        export_model(default_model, tmp_path / "repo", progress=False, report=lambda *_: None, vae_dir=folder)
    assert not (tmp_path / "repo").exists()


def test_served_by_name_and_through_a1111s_sd_vae(repo, local, tmp_path):
    """Triton serves each VAE's networks; the gateway takes A1111's sd_vae (override and option) and lists them."""
    with triton_on(repo, tmp_path) as triton:
        served = Client(triton.url).txt2img(REQUEST["prompt"], **{k: v for k, v in REQUEST.items() if k != "prompt"},
                                            vae="old-vae.pt")
        expected = local.txt2img(Txt2ImgRequest(**REQUEST, vae="old-vae.pt"))
        assert max_diff(served.images, expected.images) <= MAX_PIXEL_DIFF
        api = TestClient(create_app(Client(triton.url)))
        assert [v["model_name"] for v in api.get("/sdapi/v1/sd-vae").json()] == ["old-vae.pt", "soft-vae.safetensors"]
        body = {"prompt": REQUEST["prompt"], "negative_prompt": REQUEST["negative_prompt"], "steps": 5, "seed": 3,
                "width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7}
        response = api.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "old-vae.pt"}})
        assert response.status_code == 200, response.text[:500]
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
        a1111 = local.txt2img(Txt2ImgRequest(**REQUEST, vae="old-vae.pt", k_diffusion=True))  # (A1111's code path)
        assert max_diff(picture[None], a1111.images) <= MAX_PIXEL_DIFF
        assert "VAE: old-vae.pt" in json.loads(response.json()["info"])["infotexts"][0]
        assert api.post("/sdapi/v1/options", json={"sd_vae": "soft-vae.safetensors"}).status_code == 200
        chosen = api.post("/sdapi/v1/txt2img", json=body)
        assert "VAE: soft-vae.safetensors" in json.loads(chosen.json()["info"])["infotexts"][0]
        refused = api.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "nope.pt"}})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "override_settings.sd_vae"]
        assert api.get("/sdapi/v1/options").status_code == 200  # still serving
