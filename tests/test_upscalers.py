"""Upscaler models (A1111's models/ESRGAN and models/SwinIR): registered at export by architecture, served as
networks, tiled as A1111 tiles them, used by the hires fix.

The models are random-weight ones written here in the layouts the loader claims, from the architectures' published
definitions (BasicSR / Real-ESRGAN's RRDBNet, the original ESRGAN's "model.N" layout of the same network, and
Real-ESRGAN's SRVGGNetCompact), restated below in torch; the reference output is that torch module on the picture,
tiled by A1111 1.10's split_grid / combine_grid (restated here too) with its BGR in, 8-bit out conversion. The
SwinIR is spandrel's own module (A1111 1.10 loads SwinIR files with spandrel), tiled by A1111's SwinIR script and
its tiled_upscale_2, restated here in torch."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from reference import MAX_PIXEL_DIFF, max_diff, sample_picture
from servers import triton_on
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.errors import InvalidRequest, UsageError
from sdtrt.contract.hires import Tiling
from sdtrt.pipeline.local import LocalPipeline
from sdtrt.requests.request import Txt2ImgRequest


class RDB(nn.Module):
    """ESRGAN's residual dense block: five convolutions, each seeing all the features before it."""

    def __init__(self, nf: int, gc: int = 32):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(nf, gc, 3, 1, 1), nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3, self.conv4 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1), nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x):
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = RDB(nf), RDB(nf), RDB(nf)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """Real-ESRGAN's RRDBNet (x4; x2 and x1 see the picture pixel-unshuffled by 2 and 4), upsampling twice."""

    def __init__(self, scale: int = 4, nf: int = 8, blocks: int = 1):
        super().__init__()
        self.unshuffle = {4: 1, 2: 2, 1: 4}[scale]
        self.conv_first = nn.Conv2d(3 * self.unshuffle ** 2, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(nf) for _ in range(blocks)])
        self.conv_body, self.conv_up1, self.conv_up2 = (nn.Conv2d(nf, nf, 3, 1, 1) for _ in range(3))
        self.conv_hr, self.conv_last = nn.Conv2d(nf, nf, 3, 1, 1), nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x):
        feat = F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def old_esrgan_layout(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """The original ESRGAN repository's keys for RRDBNet x4 (RRDB_ESRGAN_x4.pth): a sequential "model"."""
    names = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}", "conv_up1": "model.3",
             "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    out = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        if head.startswith("body."):
            _, block, rdb, conv = head.split(".")
            out[f"model.1.sub.{block}.{rdb.upper()}.{conv}.0.{param}"] = value
        else:
            out[f"{names[head]}.{param}"] = value
    return out


class Compact(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact: convolutions with PReLU, a pixel shuffle, plus the nearest-upscaled input."""

    def __init__(self, scale: int = 4, nf: int = 8, convs: int = 2):
        super().__init__()
        self.scale = scale
        layers = [nn.Conv2d(3, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(convs):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        self.body = nn.ModuleList(layers + [nn.Conv2d(nf, 3 * scale * scale, 3, 1, 1)])

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        return F.pixel_shuffle(out, self.scale) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def a1111_split_grid(image: Image.Image, tile: int, overlap: int):
    """A1111's images.split_grid: rows of (y, [(x, tile)]), the last tile of each side flush with the end."""
    w, h = image.size
    cols, rows = math.ceil((w - overlap) / (tile - overlap)), math.ceil((h - overlap) / (tile - overlap))
    dx = (w - tile) / (cols - 1) if cols > 1 else 0
    dy = (h - tile) / (rows - 1) if rows > 1 else 0
    grid = []
    for row in range(rows):
        y = min(int(row * dy), h - tile)
        grid.append((y, [(min(int(col * dx), w - tile), image.crop((min(int(col * dx), w - tile), y,
                                                                    min(int(col * dx), w - tile) + tile, y + tile)))
                         for col in range(cols)]))
    return grid


def a1111_combine_grid(grid, tile: int, width: int, height: int, overlap: int) -> Image.Image:
    """A1111's images.combine_grid: each tile fades in over the one before across the overlap."""
    mask_w = Image.fromarray((np.arange(overlap, dtype=np.float32).reshape(1, overlap).repeat(tile, axis=0) * 255
                              / overlap).astype(np.uint8), "L")
    mask_h = Image.fromarray((np.arange(overlap, dtype=np.float32).reshape(overlap, 1).repeat(width, axis=1) * 255
                              / overlap).astype(np.uint8), "L")
    combined = Image.new("RGB", (width, height))
    for y, row in grid:
        line = Image.new("RGB", (width, tile))
        for x, part in row:
            if x == 0:
                line.paste(part, (0, 0))
                continue
            line.paste(part.crop((0, 0, overlap, tile)), (x, 0), mask=mask_w)
            line.paste(part.crop((overlap, 0, tile, tile)), (x + overlap, 0))
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        combined.paste(line.crop((0, 0, width, overlap)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, overlap, width, tile)), (0, y + overlap))
    return combined


@torch.no_grad()
def a1111_upscale(module: nn.Module, image: Image.Image, tile: int, overlap: int) -> Image.Image:
    """A1111 1.10's upscale_with_model: each tile BGR in [0, 1] through the model, clamped, rounded, back to RGB."""
    def patch(part: Image.Image) -> Image.Image:
        bgr = np.ascontiguousarray(np.array(part.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1)) / 255
        out = module(torch.from_numpy(bgr)[None].float())[0].clamp(0, 1).numpy()
        return Image.fromarray((255.0 * np.moveaxis(out, 0, 2)).round().astype(np.uint8)[:, :, ::-1])

    if tile <= 0:
        return patch(image)
    grid = a1111_split_grid(image, tile, overlap)
    out = [(y, [(x, patch(part)) for x, part in row]) for y, row in grid]
    s = out[0][1][0][1].width // tile
    scaled = [(y * s, [(x * s, part) for x, part in row]) for y, row in out]
    return a1111_combine_grid(scaled, tile * s, image.width * s, image.height * s, overlap * s)


@torch.no_grad()
def a1111_swinir(module: nn.Module, image: Image.Image, tile: int, overlap: int, scale: int = 4) -> Image.Image:
    """A1111 1.10's SwinIR upscale: BGR in [0, 1], mirrored to past the next multiple of 8, square tiles averaged
    where they overlap (tiled_upscale_2), cut back, clamped, rounded."""
    img = torch.from_numpy(np.moveaxis(np.array(image)[:, :, ::-1], 2, 0) / 255).float().unsqueeze(0)
    _, _, h_old, w_old = img.size()
    h_pad, w_pad = (h_old // 8 + 1) * 8 - h_old, (w_old // 8 + 1) * 8 - w_old
    img = torch.cat([img, torch.flip(img, [2])], 2)[:, :, : h_old + h_pad, :]
    img = torch.cat([img, torch.flip(img, [3])], 3)[:, :, :, : w_old + w_pad]
    b, c, h, w = img.size()
    tile = min(tile, h, w)
    if tile <= 0:
        output = module(img)
    else:
        stride = tile - overlap
        h_idx = list(range(0, h - tile, stride)) + [h - tile]
        w_idx = list(range(0, w - tile, stride)) + [w - tile]
        result = torch.zeros(b, c, h * scale, w * scale)
        weights = torch.zeros_like(result)
        for y in h_idx:
            for x in w_idx:
                out = module(img[..., y: y + tile, x: x + tile])
                result[..., y * scale: (y + tile) * scale, x * scale: (x + tile) * scale].add_(out)
                weights[..., y * scale: (y + tile) * scale, x * scale: (x + tile) * scale].add_(torch.ones_like(out))
        output = result.div_(weights)
    output = output[..., : h_old * scale, : w_old * scale].squeeze().float().clamp_(0, 1).numpy()
    output = np.transpose(output[[2, 1, 0], :, :], (1, 2, 0))
    return Image.fromarray((output * 255.0).round().astype(np.uint8), "RGB")


def tiny_swinir() -> nn.Module:
    """A real-world SwinIR x4 as A1111's default (nearest+conv upsampler, 3conv), narrow and shallow."""
    from sdtrt.export.upscalers import spandrel

    spandrel()
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR

    return SwinIR(img_size=64, in_chans=3, embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=8,
                  mlp_ratio=2, upscale=4, img_range=1.0, upsampler="nearest+conv", resi_connection="3conv")


def tiny_dat() -> nn.Module:
    """A DAT x2 (spandrel's module, as A1111 1.10 loads DAT files), narrow and shallow."""
    from sdtrt.export.upscalers import spandrel

    spandrel()
    from spandrel.architectures.DAT.__arch.DAT import DAT

    return DAT(img_size=64, in_chans=3, embed_dim=64, split_size=[8, 16], depth=[1, 1], num_heads=[4, 4],
               expansion_factor=2, upscale=2, resi_connection="1conv", upsampler="pixelshuffle")


MODELS = {}  # name -> (torch module, layout writer)


@pytest.fixture(scope="module")
def upscaler_folder(tmp_path_factory):
    """A1111's models/ESRGAN with four random models: RRDBNet x4 (new and original layout), x2, compact x4; and a
    SwinIR x4 (A1111's models/SwinIR; one folder here)."""
    folder = tmp_path_factory.mktemp("ESRGAN")
    torch.manual_seed(7)
    models = {"4x-tiny-esrgan": RRDBNet(4), "4x-tiny-old": RRDBNet(4), "2x-tiny-esrgan": RRDBNet(2),
              "4x-tiny-compact": Compact(4), "4x-tiny-swinir": tiny_swinir(), "2x-tiny-dat": tiny_dat()}
    for name, module in models.items():
        module.eval()
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        if name == "4x-tiny-old":
            torch.save(old_esrgan_layout(state, 1), str(folder / f"{name}.pth"))
        else:
            save_file(state, str(folder / f"{name}.safetensors"))
    MODELS.update(models)
    return folder


@pytest.fixture(scope="module")
def repo(export_default, upscaler_folder):
    return export_default("upscaler-repo", upscaler_dir=upscaler_folder)


@pytest.fixture(scope="module")
def local(repo):
    return LocalPipeline(repo)


def test_each_file_is_registered_under_its_stem_with_its_architecture_and_scale(local):
    registered = {name: (e["architecture"], e["scale"]) for name, e in local.spec.upscalers.items()}
    assert registered == {"2x-tiny-esrgan": ("ESRGAN", 2), "4x-tiny-compact": ("RealESRGAN Compact", 4),
                          "4x-tiny-esrgan": ("ESRGAN", 4), "4x-tiny-old": ("ESRGAN", 4),
                          "4x-tiny-swinir": ("SwinIR", 4), "2x-tiny-dat": ("DAT", 2)}
    assert {name: e["tiling"] for name, e in local.spec.upscalers.items()} == {
        **{name: "grid" for name in registered if "swinir" not in name and "dat" not in name},
        "4x-tiny-swinir": "swin", "2x-tiny-dat": "dat"}
    assert set(local.spec.upscalers) <= set(local.spec.field("hr_upscaler").choices)


@pytest.mark.parametrize("name", ["4x-tiny-esrgan", "4x-tiny-old", "2x-tiny-esrgan", "4x-tiny-compact", "2x-tiny-dat"])
@pytest.mark.parametrize("tile, overlap", [(0, 0), (32, 8)])
def test_the_network_tiled_as_a1111_tiles_it_gives_the_torch_modules_picture(local, name, tile, overlap):
    from sdtrt.postprocessing.model_upscale import upscale_once

    picture = Image.fromarray(sample_picture(56, 40))
    model = local.networks(local.plan(Txt2ImgRequest(prompt="x"))).upscaler(name)
    ours = upscale_once(picture, model, Tiling(grid=(tile, overlap), dat=(tile, overlap)))
    expected = a1111_upscale(MODELS[name], picture, tile, overlap)
    assert ours.size == expected.size == (56 * local.spec.upscalers[name]["scale"], 40 * local.spec.upscalers[name]["scale"])
    assert max_diff(np.asarray(ours)[None], np.asarray(expected)[None]) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("tile, overlap", [(0, 0), (32, 8), (24, 4), (20, 6)])
def test_a_swinir_tiled_as_a1111s_swinir_script_tiles_it_gives_the_torch_modules_picture(local, tile, overlap):
    """Mirrored to 64x48, then tiles of 32 (stepping 24), 24, and 20 (not a multiple of the window: the network's
    input is reflect-padded to one and cut back, as the torch module pads itself); 0: the whole picture at once."""
    from sdtrt.postprocessing.model_upscale import upscale_once

    picture = Image.fromarray(sample_picture(56, 40))
    model = local.networks(local.plan(Txt2ImgRequest(prompt="x"))).upscaler("4x-tiny-swinir")
    assert (model.tiling, model.batch, model.multiple_of) == ("swin", 1, 8)
    ours = upscale_once(picture, model, Tiling(grid=(16, 15), swin=(tile, overlap)))  # (the grid's: not read)
    expected = a1111_swinir(MODELS["4x-tiny-swinir"].eval(), picture, tile, overlap)
    assert ours.size == expected.size == (224, 160)
    assert max_diff(np.asarray(ours)[None], np.asarray(expected)[None]) <= MAX_PIXEL_DIFF


def test_an_overlap_as_large_as_its_tile_is_refused_naming_both_fields(local):
    with pytest.raises(InvalidRequest) as exc:
        local.txt2img(Txt2ImgRequest(**{**HIRES, "hr_upscaler": "4x-tiny-swinir", "swinir_tile": 16,
                                        "swinir_tile_overlap": 16}))
    assert exc.value.field == "swinir_tile_overlap" and "below swinir_tile (16)" in str(exc.value)
    with pytest.raises(InvalidRequest) as exc:
        local.txt2img(Txt2ImgRequest(**{**HIRES, "hr_upscaler": "4x-tiny-compact", "upscaler_tile": 16,
                                        "upscaler_tile_overlap": 40}))
    assert exc.value.field == "upscaler_tile_overlap"
    # another family's tiles are not read: no refusal for them
    local.plan(Txt2ImgRequest(**{**HIRES, "hr_upscaler": "4x-tiny-compact", "swinir_tile": 16,
                                 "swinir_tile_overlap": 16}))


def test_a_2x_model_runs_twice_for_a_4x_upscale_then_lanczos_to_the_size(local):
    """A1111's Upscaler.upscale: the model until the picture covers the target, then Lanczos down to it."""
    from sdtrt.postprocessing.model_upscale import upscale_to

    picture = Image.fromarray(sample_picture(40, 40))
    model = local.networks(local.plan(Txt2ImgRequest(prompt="x"))).upscaler("2x-tiny-esrgan")
    ours = upscale_to(picture, model, 120, 120, Tiling(grid=(0, 0)))
    twice = a1111_upscale(MODELS["2x-tiny-esrgan"], a1111_upscale(MODELS["2x-tiny-esrgan"], picture, 0, 0), 0, 0)
    expected = twice.resize((120, 120), resample=Image.Resampling.LANCZOS)
    assert max_diff(np.asarray(ours)[None], np.asarray(expected)[None]) <= MAX_PIXEL_DIFF


HIRES = dict(prompt="a castle on a hill", steps=4, seed=3, width=64, height=64, sampler="Euler a", enable_hr=True,
             hr_scale=1.5, denoising_strength=0.5, upscaler_tile=32, upscaler_tile_overlap=8)


def test_the_hires_fix_upscales_with_the_model_served_and_in_process(repo, local, tmp_path):
    model = local.txt2img(Txt2ImgRequest(**HIRES, hr_upscaler="4x-tiny-compact"))
    lanczos = local.txt2img(Txt2ImgRequest(**HIRES, hr_upscaler="Lanczos"))
    assert model.images.shape == (1, 96, 96, 3) and max_diff(model.images, lanczos.images) > MAX_PIXEL_DIFF
    assert "Hires upscaler: 4x-tiny-compact" in model.infotexts[0]
    with triton_on(repo, tmp_path) as triton:
        served = Client(triton.url).txt2img(HIRES["prompt"], **{k: v for k, v in HIRES.items() if k != "prompt"},
                                            hr_upscaler="4x-tiny-compact")
        assert max_diff(served.images, model.images) <= MAX_PIXEL_DIFF
        api = TestClient(create_app(Client(triton.url)))
        listed = {item["name"]: item["scale"] for item in api.get("/sdapi/v1/upscalers").json()}
        assert {"Lanczos": 4, "4x-tiny-esrgan": 4, "2x-tiny-esrgan": 2, "4x-tiny-compact": 4} .items() <= listed.items()
        assert [item["name"] for item in api.get("/sdapi/v1/realesrgan-models").json()] == ["4x-tiny-compact"]
        body = {"prompt": HIRES["prompt"], "steps": 4, "seed": 3, "width": 64, "height": 64, "sampler_name": "Euler a",
                "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_upscaler": "4x-tiny-compact",
                "override_settings": {"ESRGAN_tile": 32, "ESRGAN_tile_overlap": 8}}
        response = api.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text[:500]
        info = json.loads(response.json()["info"])["infotexts"][0]
        assert "Hires upscaler: 4x-tiny-compact" in info and "Size: 64x64" in info
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
        a1111 = local.txt2img(Txt2ImgRequest(**HIRES, hr_upscaler="4x-tiny-compact", k_diffusion=True))  # 32 px tiles
        assert max_diff(picture[None], a1111.images) <= MAX_PIXEL_DIFF
        swin = {**body, "hr_upscaler": "4x-tiny-swinir", "override_settings": {"SWIN_tile": 32, "SWIN_tile_overlap": 4}}
        response = api.post("/sdapi/v1/txt2img", json=swin)
        assert response.status_code == 200, response.text[:500]
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
        swinir = local.txt2img(Txt2ImgRequest(**HIRES, hr_upscaler="4x-tiny-swinir", swinir_tile=32,
                                              swinir_tile_overlap=4, k_diffusion=True))
        assert max_diff(picture[None], swinir.images) <= MAX_PIXEL_DIFF
        assert max_diff(swinir.images, a1111.images) > MAX_PIXEL_DIFF  # (another upscaler's picture)
        extras_through_the_gateway(api)
        sd_upscale_through_the_gateway(api)


def _png(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _picture(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))[None]


def extras_through_the_gateway(api: TestClient) -> None:
    """A1111's Extras with a model (its default 192 px tiles: a 40 px picture is one tile, black beyond it, as
    A1111's split_grid cuts it), a second upscaler blended in, and the batch route."""
    pictures = [Image.fromarray(sample_picture(40, 40)), Image.fromarray(sample_picture(48, 32))]
    body = {"image": _png(pictures[0]), "upscaler_1": "4x-tiny-compact", "upscaling_resize": 2}
    response = api.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 200, response.text[:500]
    expected = a1111_upscale(MODELS["4x-tiny-compact"], pictures[0], 192, 8).resize((80, 80), Image.Resampling.LANCZOS)
    assert max_diff(_picture(response.json()["image"]), np.asarray(expected)[None]) <= MAX_PIXEL_DIFF
    batch = {"imageList": [{"data": _png(p), "name": f"{i}.png"} for i, p in enumerate(pictures)],
             "upscaler_1": "4x-tiny-compact", "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5,
             "upscaling_resize": 2}
    response = api.post("/sdapi/v1/extra-batch-images", json=batch)
    assert response.status_code == 200, response.text[:500]
    for picture, data in zip(pictures, response.json()["images"]):
        size = (picture.width * 2, picture.height * 2)
        model = a1111_upscale(MODELS["4x-tiny-compact"], picture, 192, 8).resize(size, Image.Resampling.LANCZOS)
        expected = Image.blend(model, picture.resize(size, Image.Resampling.LANCZOS), 0.5)
        assert max_diff(_picture(data), np.asarray(expected)[None]) <= MAX_PIXEL_DIFF
    swinir = api.post("/sdapi/v1/extra-single-image", json={**body, "upscaler_1": "4x-tiny-swinir"})
    assert swinir.status_code == 200, swinir.text[:500]  # (the user's SWIN_tile options: A1111's 192 and 8)
    expected = a1111_swinir(MODELS["4x-tiny-swinir"].eval(), pictures[0], 192, 8).resize((80, 80), Image.Resampling.LANCZOS)
    assert max_diff(_picture(swinir.json()["image"]), np.asarray(expected)[None]) <= MAX_PIXEL_DIFF
    refused = api.post("/sdapi/v1/extra-single-image", json={**body, "upscaler_1": "4x-UltraSharp"})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "upscaler_1"]
    assert "'4x-tiny-compact'" in refused.text


def sd_upscale_through_the_gateway(api: TestClient) -> None:
    """A1111's SD upscale script with a model as its upscaler (by name, or by index after A1111's own)."""
    source = _png(Image.fromarray(sample_picture(64, 64)))
    body = {"prompt": "a castle", "seed": 20, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
            "init_images": [source], "denoising_strength": 0.4, "script_name": "SD upscale"}
    runs = {}
    for upscaler in ("4x-tiny-compact", "Lanczos"):
        response = api.post("/sdapi/v1/img2img", json={**body, "script_args": [None, 16, upscaler, 2]})
        assert response.status_code == 200, response.text[:500]
        runs[upscaler] = response.json()
    info = json.loads(runs["4x-tiny-compact"]["info"])["infotexts"][0]
    assert "SD upscale upscaler: 4x-tiny-compact" in info
    model, lanczos = (_picture(runs[u]["images"][0]) for u in ("4x-tiny-compact", "Lanczos"))
    assert model.shape == lanczos.shape == (1, 128, 128, 3) and max_diff(model, lanczos) > MAX_PIXEL_DIFF
    info = api.get("/sdapi/v1/script-info").json()
    upscaler = next(a for i in info if i["name"] == "sd upscale" for a in i["args"] if a["label"] == "Upscaler")
    assert upscaler["choices"] == ["None", "Lanczos", "Nearest", *sorted(MODELS)]  # what the index counts in
    index = 3 + sorted(MODELS).index("4x-tiny-compact")  # None, Lanczos, Nearest, then the models
    by_index = api.post("/sdapi/v1/img2img", json={**body, "script_args": [None, 16, index, 2]}).json()
    assert (_picture(by_index["images"][0]) == model).all()


def test_a_model_pass_over_the_bounds_is_refused_before_it_runs():
    """A 4x model on 3000 px for a 2x result: the result (6000 px) fits, the model's pass (12000 px) does not."""
    from sdtrt.postprocessing.upscale import ExtrasUpscale, check_upscale

    check_upscale((3000, 3000), ExtrasUpscale("Lanczos", scale=2.0))
    with pytest.raises(InvalidRequest) as exc:
        check_upscale((3000, 3000), ExtrasUpscale("4x-model", scale=2.0), {"4x-model": 4})
    assert exc.value.field == "upscaling_resize" and "12000x12000" in str(exc.value)


def test_an_unknown_upscaler_and_a_wrong_file_are_named(local, default_model, tmp_path):
    from sdtrt.export import export_model

    with pytest.raises(InvalidRequest) as exc:
        local.txt2img(Txt2ImgRequest(**{**HIRES, "hr_upscaler": "4x-UltraSharp"}))
    assert exc.value.field == "hr_upscaler" and "'4x-tiny-compact'" in str(exc.value)
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    save_file({"weight": torch.zeros(3, 3)}, str(folder / "not-a-model.safetensors"))
    with pytest.raises(UsageError, match="not-a-model.safetensors: not an upscaler architecture spandrel knows"):
        export_model(default_model, tmp_path / "repo", progress=False, report=lambda *_: None, upscaler_dir=folder)
    assert not (tmp_path / "repo").exists()


def test_a_tensorrt_engine_for_an_upscaler_spans_the_tile_sizes(local):
    """The engine's profile (built on a GPU): a batch of tiles from 16 to 512 px a side, A1111's 192 the optimum."""
    from sdtrt.contract.spec import upscaler_component
    from sdtrt.export.tensorrt import EngineOptions, profile_shapes

    spec = local.spec
    component = spec.component(upscaler_component(spec.upscalers["4x-tiny-esrgan"]["slug"]))
    batch = spec.dims["batch"]
    assert profile_shapes(spec, component, EngineOptions()) == {
        "image": [(batch.min, 3, 16, 16), (batch.opt, 3, 192, 192), (batch.max, 3, 512, 512)]}
    swinir = spec.component(upscaler_component(spec.upscalers["4x-tiny-swinir"]["slug"]))  # one tile a call
    assert profile_shapes(spec, swinir, EngineOptions()) == {"image": [(1, 3, 16, 16), (1, 3, 192, 192), (1, 3, 512, 512)]}
    dat = spec.component(upscaler_component(spec.upscalers["2x-tiny-dat"]["slug"]))
    assert profile_shapes(spec, dat, EngineOptions())["image"][2] == (1, 3, 512, 512)


def test_a_file_dropped_into_the_folder_is_served_after_the_export_again_and_models_load(default_model, repo,
                                                                                          upscaler_folder, tmp_path,
                                                                                          capsys):
    """The same export again, its folder changed: only the upscaler networks are exported (new ones) and removed
    (files gone); the running server serves them after `sdtrt models load`, no restart."""
    import shutil

    from sdtrt.client.apps.cli import main as cli

    live, folder = tmp_path / "repo", tmp_path / "ESRGAN"
    shutil.copytree(repo, live)
    shutil.copytree(upscaler_folder, folder)
    (folder / "2x-tiny-esrgan.safetensors").unlink()
    torch.manual_seed(11)
    save_file({k: v.contiguous() for k, v in Compact(4).state_dict().items()}, str(folder / "4x-new-compact.safetensors"))
    key = LocalPipeline(live).spec.key
    unet = live / f"{key}__unet" / "1" / "model.onnx"
    before = unet.stat().st_mtime_ns
    with triton_on(live, tmp_path / "logs") as triton:
        client = Client(triton.url)
        capsys.readouterr()
        # (the fixture exported through the library, on onnxruntime; the CLI's own default is auto, and how the
        # networks are served is one of an export's inputs, so the same inputs again name it)
        assert cli(["export", str(default_model), "--out", str(live), "--upscalers", str(folder),
                    "--cpu-engine", "onnxruntime"]) == 0
        out = capsys.readouterr().out
        assert "(1 exported, 1 removed)" in out, out[-500:]
        assert unet.stat().st_mtime_ns == before  # the rest of the model as it was
        assert "4x-new-compact" not in client.upscalers()  # the server reads its repository when told to
        assert cli(["models", "load", key, "--url", triton.url]) == 0
        client.refresh()
        assert "4x-new-compact" in client.upscalers() and "2x-tiny-esrgan" not in client.upscalers()
        settings = {**{k: v for k, v in HIRES.items() if k != "prompt"}, "hr_upscaler": "4x-new-compact"}
        served = client.txt2img(HIRES["prompt"], **settings)
    local = LocalPipeline(live).txt2img(Txt2ImgRequest(prompt=HIRES["prompt"], **settings))
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    assert not (live / f"{key}__upscaler_2x-tiny-esrgan").exists()
