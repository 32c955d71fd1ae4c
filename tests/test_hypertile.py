"""A1111's Hypertile (its options hypertile_enable_unet, ..._vae, their depth, tile and swap size) as an export
variant a request selects (`sdtrt export --hypertile`, the hypertile_* fields), in-process and served.

The reference is diffusers' own pipeline with A1111 1.10's Hypertile hooks restated below (extensions-builtin/
hypertile: its random_divisor, find_hw_candidates, self_attn_forward with einops, hooked on the modules its
DEPTH_LAYERS names for diffusers' SD 1.5 U-Net and VAE), seeded and configured as its script does. The model is the
trained default one ("shapes": three levels, attention at the first two), at sizes where the tiles are drawn from
more than one choice."""

from __future__ import annotations

import math
import random
from functools import wraps

import numpy as np
import pytest
import torch
from einops import rearrange

from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.request import Txt2ImgRequest

# A1111's diffusers names by depth (its DEPTH_LAYERS' SD 1.5 entries)
A1111_LAYERS = {
    0: ["down_blocks.0.attentions.0.transformer_blocks.0.attn1", "down_blocks.0.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.3.attentions.0.transformer_blocks.0.attn1", "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn1", "decoder.mid_block.attentions.0"],
    1: ["down_blocks.1.attentions.0.transformer_blocks.0.attn1", "down_blocks.1.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1", "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.2.transformer_blocks.0.attn1"],
    2: ["down_blocks.2.attentions.0.transformer_blocks.0.attn1", "down_blocks.2.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1", "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1"],
    3: ["mid_block.attentions.0.transformer_blocks.0.attn1"],
}
RNG = random.Random()


def a1111_random_divisor(value: int, min_value: int, max_options: int = 1) -> int:
    min_value = min(min_value, value)
    divisors = [i for i in range(min_value, value + 1) if value % i == 0]
    ns = [value // i for i in divisors[:max_options]]
    return ns[RNG.randint(0, len(ns) - 1)]


def a1111_largest_tile(width: int, height: int) -> int:
    gcd, tile = math.gcd(width, height), 1
    while gcd % (tile * 2) == 0:
        tile *= 2
    return tile


def a1111_hw(hw: int, aspect: float) -> tuple[int, int]:
    h, w = round(math.sqrt(hw * aspect)), round(math.sqrt(hw / aspect))
    if h * w != hw:
        if (hw / h).is_integer():
            w = int(hw / h)
        elif (hw / w).is_integer():
            h = int(hw / w)
        else:
            pairs = [(i, hw // i) for i in range(2, hw + 1) if hw % i == 0]
            ratios = [b / a for a, b in pairs]
            return pairs[ratios.index(min(ratios, key=lambda r: abs(r - aspect)))]
    return h, w


class Params:
    def __init__(self, forward, depth):
        self.forward, self.depth = forward, depth
        self.tile_size = self.swap_size = 0
        self.aspect_ratio, self.enabled = 1.0, False


def a1111_forward(params: Params):
    @wraps(params.forward)
    def wrapper(*args, **kwargs):
        if not params.enabled:
            return params.forward(*args, **kwargs)
        latent_tile_size = max(128, params.tile_size) // 8
        x = args[0]
        if x.ndim == 4:
            b, c, h, w = x.shape
            nh = a1111_random_divisor(h, latent_tile_size, params.swap_size)
            nw = a1111_random_divisor(w, latent_tile_size, params.swap_size)
            if nh * nw > 1:
                x = rearrange(x, "b c (nh h) (nw w) -> (b nh nw) c h w", nh=nh, nw=nw)
            out = params.forward(x, *args[1:], **kwargs)
            if nh * nw > 1:
                out = rearrange(out, "(b nh nw) c h w -> b c (nh h) (nw w)", nh=nh, nw=nw)
            return out
        hw = x.size(1)
        h, w = a1111_hw(hw, params.aspect_ratio)
        assert h * w == hw
        factor = 2 ** params.depth
        nh = a1111_random_divisor(h, latent_tile_size * factor, params.swap_size)
        nw = a1111_random_divisor(w, latent_tile_size * factor, params.swap_size)
        if nh * nw > 1:
            x = rearrange(x, "b (nh h nw w) c -> (b nh nw) (h w) c", h=h // nh, w=w // nw, nh=nh, nw=nw)
        out = params.forward(x, *args[1:], **kwargs)
        if nh * nw > 1:
            out = rearrange(out, "(b nh nw) hw c -> b nh nw hw c", nh=nh, nw=nw)
            out = rearrange(out, "b nh nw (h w) c -> b (nh h nw w) c", h=h // nh, w=w // nw)
        return out
    return wrapper


def a1111_hook(model, width, height, *, enable, tile_size_max, swap_size, max_depth):
    layers = getattr(model, "_a1111_hypertile", None)
    if layers is None:
        layers = {}
        for depth in range(4):
            for name, module in model.named_modules():
                if any(name.endswith(n) for n in A1111_LAYERS[depth]):
                    params = Params(module.forward, depth)
                    module.forward = a1111_forward(params)
                    layers[name] = params
        model._a1111_hypertile = layers
    for params in layers.values():
        params.tile_size = min(a1111_largest_tile(width, height), tile_size_max)
        params.swap_size, params.aspect_ratio = swap_size, width / height
        params.enabled = enable and params.depth <= max_depth


def a1111_pipe(pipe, seed, width, height, unet=True, vae=True, unet_options=(3, 256, 3), vae_options=(3, 128, 3)):
    """A1111's script's process(): seeded with the first seed, both networks configured for the size."""
    RNG.seed(seed)
    depth, tile, swap = vae_options
    a1111_hook(pipe.vae, width, height, enable=vae, tile_size_max=tile, swap_size=swap, max_depth=depth)
    depth, tile, swap = unet_options
    a1111_hook(pipe.unet, width, height, enable=unet, tile_size_max=tile, swap_size=swap, max_depth=depth)


SETTINGS = dict(sampler="Euler", steps=6, seed=12, width=256, height=192)
PROMPT = "a red circle on a blue square"


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    from sdtrt.pipeline.default_model import build_default_model

    return build_default_model(tmp_path_factory.mktemp("models") / "shapes", size="shapes")


@pytest.fixture(scope="module")
def repo(shapes_model, tmp_path_factory):
    from sdtrt.export import export_model

    out = tmp_path_factory.mktemp("repos") / "hypertile"
    export_model(shapes_model, out, hypertile=True, progress=False, report=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def local(repo):
    from sdtrt.pipeline.local import LocalPipeline

    return LocalPipeline(repo)


@pytest.fixture(scope="module")
def pipe(shapes_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(shapes_model), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, unet=True, vae=True, **changes):
    settings = {**SETTINGS, **changes}
    a1111_pipe(pipe, settings["seed"], settings["width"], settings["height"], unet, vae)
    try:
        return diffusers_images(pipe, prompt=PROMPT, cfg=7.0, **settings)
    finally:
        a1111_pipe(pipe, 0, 64, 64, False, False)  # (off again)


def test_the_layers_are_a1111s_in_the_order_they_run(local):
    from sdtrt.contract.spec import HYPERTILE

    names = [name for name, _, _ in local.spec.extra[HYPERTILE]]
    assert names == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                     "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
                     "mid_block.attentions.0.transformer_blocks.0.attn1",
                     "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                     "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
                     "up_blocks.2.attentions.0.transformer_blocks.0.attn1",
                     "up_blocks.2.attentions.1.transformer_blocks.0.attn1"]
    assert [(depth, level) for _, depth, level in local.spec.extra[HYPERTILE]] == [
        (0, 0), (1, 1), (3, 2), (2, 1), (2, 1), (1, 0), (1, 0)]


def test_the_draws_split_the_picture_as_a1111s_do():
    """At 256x192 the first layer is cut in two or not, by draw; the VAE's middle attention too."""
    from sdtrt.requests.hypertile import HypertileDraws, HypertileOptions

    draws = HypertileDraws(12, [(0, 0), (3, 2)], HypertileOptions(True), HypertileOptions(True, max_tile=128), False,
                           (256, 192))
    RNG.seed(12)
    seen = set()
    for _ in range(20):
        ours = draws.unet_splits(24, 32)
        nh = a1111_random_divisor(32, 16, 3)  # (A1111 reads the 768 tokens as 32 x 24: the width first)
        nw = a1111_random_divisor(24, 16, 3)
        mid = (a1111_random_divisor(8, 128, 3), a1111_random_divisor(6, 128, 3))
        assert ours == [nh, nw, 32, *mid, 8]
        seen.add(nh)
    assert seen == {1, 2}


def test_hypertile_matches_a1111s_hooks_on_diffusers(local, pipe):
    ours = local.txt2img(Txt2ImgRequest(PROMPT, guidance_scale=7.0, hypertile_enable_unet=True, hypertile_enable_vae=True,
                                        **SETTINGS))
    plain = local.txt2img(Txt2ImgRequest(PROMPT, guidance_scale=7.0, **SETTINGS))
    expected = reference(pipe)
    assert max_diff(ours.images, expected) <= MAX_PIXEL_DIFF
    assert max_diff(ours.images, plain.images) > 4, "the tiles changed the picture"
    assert max_diff(plain.images, reference(pipe, unet=False, vae=False)) <= MAX_PIXEL_DIFF
    vae_only = local.txt2img(Txt2ImgRequest(PROMPT, guidance_scale=7.0, hypertile_enable_vae=True, **SETTINGS))
    assert max_diff(vae_only.images, reference(pipe, unet=False)) <= MAX_PIXEL_DIFF


def test_served_hypertile_is_the_in_process_picture(repo, local, tmp_path):
    from servers import triton_on
    from sdtrt.client import Client

    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from sdtrt.client.apps.a1111_api import create_app

    request = dict(guidance_scale=7.0, hypertile_enable_unet=True, hypertile_enable_vae=True, **SETTINGS)
    with triton_on(repo, tmp_path) as triton:
        client = Client(triton.url)
        served = client.txt2img(PROMPT, **{**request, "batch_size": 2})
        # A1111's own request: the options as override_settings (a smaller swap size: other tiles)
        body = {"prompt": PROMPT, "steps": 6, "seed": 12, "width": 256, "height": 192, "sampler_name": "Euler",
                "cfg_scale": 7.0, "override_settings": {"hypertile_enable_unet": True, "hypertile_swap_size_unet": 2}}
        response = TestClient(create_app(client)).post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text[:500]
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
    in_process = local.txt2img(Txt2ImgRequest(PROMPT, **{**request, "batch_size": 2}))
    assert max_diff(served.images, in_process.images) <= MAX_PIXEL_DIFF
    a1111 = local.txt2img(Txt2ImgRequest(PROMPT, guidance_scale=7.0, hypertile_enable_unet=True,
                                         hypertile_swap_size_unet=2, k_diffusion=True, **SETTINGS))
    assert max_diff(picture[None], a1111.images) <= MAX_PIXEL_DIFF


def test_a_model_without_the_variants_and_what_they_cannot_do_are_named(local, local_pipeline):
    with pytest.raises(InvalidRequest) as refused:
        local_pipeline.txt2img(Txt2ImgRequest("x", steps=1, hypertile_enable_unet=True))
    assert refused.value.field == "hypertile_enable_unet" and "--hypertile" in str(refused.value)
    with pytest.raises(InvalidRequest) as refused:
        local.txt2img(Txt2ImgRequest("x", steps=1, hypertile_enable_vae=True, hypertile_swap_size_vae=0))
    assert refused.value.field == "hypertile_swap_size_vae"
    with pytest.raises(InvalidRequest) as refused:
        local.txt2img(Txt2ImgRequest("x", steps=1, hypertile_enable_unet=True, tiling=True))
    assert refused.value.field in ("tiling", "hypertile_enable_unet")  # (no export does both)


def test_the_hires_fix_second_pass_is_configured_again_as_a1111s_before_hr():
    """Its own size and switch; reseeded first unless the U-Net option was on for the first pass."""
    from sdtrt.requests.hypertile import HypertileDraws, HypertileOptions

    layers = [(0, 0), (1, 1)]
    only_second = HypertileDraws(12, layers, HypertileOptions(False), HypertileOptions(), True, (256, 192))
    assert not only_second.unet_on
    only_second.before_hires((384, 256))
    fresh = HypertileDraws(12, layers, HypertileOptions(True), HypertileOptions(), True, (384, 256))
    assert [only_second.unet_splits(32, 48) for _ in range(5)] == [fresh.unet_splits(32, 48) for _ in range(5)]
    both = HypertileDraws(12, layers, HypertileOptions(True), HypertileOptions(), False, (256, 192))
    both.unet_splits(24, 32)
    both.before_hires((384, 256))
    assert not both.unet_on  # the second pass's switch is off


def test_a_hires_request_with_the_second_pass_switch_draws_only_there(local):
    hires = dict(guidance_scale=7.0, enable_hr=True, hr_scale=1.5, denoising_strength=1.0, hr_upscaler="Latent",
                 **{**SETTINGS, "width": 192, "height": 128})
    plain = local.txt2img(Txt2ImgRequest(PROMPT, **hires))
    second = local.txt2img(Txt2ImgRequest(PROMPT, hypertile_enable_unet_secondpass=True, **hires))
    assert plain.images.shape == second.images.shape == (1, 192, 288, 3)
    assert max_diff(plain.images, second.images) > 0


def test_an_sdxl_unet_takes_a1111s_xl_layers(tmp_path):
    """A1111's SDXL table (ldm names): input_blocks.4's first transformer block at depth 0, the middle block's at 2,
    output_blocks.0-2's at 1; the tiny SDXL U-Net has one transformer block a level."""
    from diffusers import UNet2DConditionModel

    from sdtrt.export.hypertile import unet_layers
    from sdtrt.pipeline.default_model import model_configs

    unet = UNet2DConditionModel(**model_configs(family="sdxl")["unet"])
    assert unet_layers(unet) == [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1", 0, 1),
        ("mid_block.attentions.0.transformer_blocks.0.attn1", 2, 1),
        ("up_blocks.0.attentions.0.transformer_blocks.0.attn1", 1, 1),
        ("up_blocks.0.attentions.1.transformer_blocks.0.attn1", 1, 1)]


def test_engines_are_refused_for_an_export_with_the_variants(local, shapes_model, tmp_path):
    """They would need the tiles as TensorRT profile values: refused at export, and when engines are built later."""
    from sdtrt.contract.errors import UsageError
    from sdtrt.export import export_model
    from sdtrt.export.tensorrt import EngineOptions, build_engines

    with pytest.raises(UsageError, match="--hypertile"):
        build_engines(tmp_path, local.spec, EngineOptions())
    with pytest.raises(UsageError, match="--hypertile with --engines"):
        export_model(shapes_model, tmp_path / "repo", hypertile=True, engines=EngineOptions(), progress=False,
                     report=lambda *_: None)
    assert not (tmp_path / "repo").exists()
