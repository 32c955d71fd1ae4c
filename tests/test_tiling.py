"""A1111's seamless Tiling as an export variant a request selects (`sdtrt export --tiling`, the `tiling` field),
against diffusers' own pipelines with every Conv2d of the U-Net and VAE set to circular padding by this test (what
A1111's apply_circular does to its model), in-process and served, with and without a LoRA."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from loras import make_lora
from reference import MAX_PIXEL_DIFF, diffusers_images, diffusers_img2img, max_diff, sample_picture
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest
from servers import triton_on

SETTINGS = dict(sampler="Euler a", steps=8, seed=31, width=96, height=64)
PROMPT = "a tiled floor"


@contextlib.contextmanager
def circular(pipe):
    """Every Conv2d of the pipeline's U-Net and VAE pads circularly while the block runs."""
    convs = [m for net in (pipe.unet, pipe.vae) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"


def fresh_pipe(default_model, lora_file=None, weight=1.0):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file), adapter_name="tiles")
        pipe.set_adapters(["tiles"], adapter_weights=[weight])
    return pipe


@pytest.fixture(scope="module")
def loras(default_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiling-loras")
    make_lora(default_model, folder, seed=5, name="tiles", strength=4)
    return folder


@pytest.fixture(scope="module")
def repo(default_model, loras, tmp_path_factory):
    from sdtrt.export import export_model

    out = tmp_path_factory.mktemp("repos") / "tiling"
    export_model(default_model, out, tiling=True, lora_dir=loras, progress=False, report=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def local(repo):
    from sdtrt.pipeline.local import LocalPipeline

    return LocalPipeline(repo)


@pytest.fixture(scope="module")
def client(repo, tmp_path_factory):
    from sdtrt.client import Client

    with triton_on(repo, tmp_path_factory.mktemp("tiling-logs")) as triton:
        yield Client(triton.url)


@pytest.fixture(scope="module")
def expected(default_model):
    pipe = fresh_pipe(default_model)
    with circular(pipe):
        tiled = diffusers_images(pipe, prompt=PROMPT, cfg=7.0, **SETTINGS)
    return {"tiled": tiled, "plain": diffusers_images(pipe, prompt=PROMPT, cfg=7.0, **SETTINGS)}


def test_an_export_with_tiling_has_the_variants_and_one_without_refuses_tiling(local, local_pipeline):
    assert local.spec.tiles and not local_pipeline.spec.tiles
    assert {"unet_tiling", "vae_decoder_tiling", "vae_encoder_tiling", "unet_tiling_lora"} <= set(local.spec.components)
    with pytest.raises(InvalidRequest) as excinfo:
        local_pipeline.txt2img(Txt2ImgRequest(PROMPT, tiling=True, **SETTINGS))
    assert excinfo.value.field == "tiling" and "--tiling" in str(excinfo.value)


def test_tiling_matches_diffusers_with_circular_padding(local, expected):
    tiled = local.txt2img(Txt2ImgRequest(PROMPT, guidance_scale=7.0, tiling=True, **SETTINGS))
    plain = local.txt2img(Txt2ImgRequest(PROMPT, guidance_scale=7.0, **SETTINGS))
    assert max_diff(tiled.images, expected["tiled"]) <= MAX_PIXEL_DIFF
    assert max_diff(plain.images, expected["plain"]) <= MAX_PIXEL_DIFF  # the export's plain networks are unchanged
    assert max_diff(tiled.images, plain.images) > 10  # circular padding really changed the picture
    assert "Tiling: True" in tiled.infotexts[0] and "Tiling" not in plain.infotexts[0]  # as A1111 writes it


def test_tiled_img2img_matches_diffusers_with_circular_padding(local, default_model):
    picture = sample_picture(64, 64)
    result = local.img2img(Img2ImgRequest("a mosaic", sampler="Euler", steps=8, guidance_scale=7.0, seed=4, width=64,
                                          height=64, denoising_strength=0.6, tiling=True), picture)
    pipe = fresh_pipe(default_model)
    with circular(pipe):  # the VAE's encoder pads circularly too
        expected = diffusers_img2img(pipe, Image.fromarray(picture), prompt="a mosaic", sampler="Euler", steps=8,
                                     cfg=7.0, strength=0.6, seed=4)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF


def test_served_tiling_matches_diffusers_with_and_without_a_lora(client, default_model, loras, expected):
    served = client.txt2img(PROMPT, guidance_scale=7.0, tiling=True, **SETTINGS)
    assert max_diff(served.images, expected["tiled"]) <= MAX_PIXEL_DIFF
    assert "Tiling: True" in served.infotexts[0]
    with_lora = client.txt2img(f"{PROMPT} <lora:tiles:0.8>", guidance_scale=7.0, tiling=True, **SETTINGS)
    pipe = fresh_pipe(default_model, loras / "tiles.safetensors", 0.8)
    with circular(pipe):
        reference = diffusers_images(pipe, prompt=PROMPT, cfg=7.0, **SETTINGS)
    assert max_diff(with_lora.images, reference) <= MAX_PIXEL_DIFF
    assert max_diff(with_lora.images, served.images) > 10  # the LoRA was applied on the tiling U-Net


def test_a_tiled_picture_wraps_at_its_edges(local):
    """Circular padding makes the picture's opposite edges continue each other: the step across the seams (left to
    right, top to bottom) is about a step between neighbouring pixels inside; the plain pictures' seams are not."""
    def seam_ratio(images: np.ndarray) -> float:
        images = images.astype(np.float64)
        inside = np.abs(np.diff(images, axis=2)).mean() + np.abs(np.diff(images, axis=1)).mean()
        seams = np.abs(images[:, :, 0] - images[:, :, -1]).mean() + np.abs(images[:, 0] - images[:, -1]).mean()
        return seams / inside

    settings = {**SETTINGS, "batch_size": 4}
    tiled = local.txt2img(Txt2ImgRequest(PROMPT, tiling=True, **settings)).images
    plain = local.txt2img(Txt2ImgRequest(PROMPT, **settings)).images
    assert seam_ratio(tiled) < 1.0 < seam_ratio(plain)  # measured: 0.86 and 1.19 on these seeds
