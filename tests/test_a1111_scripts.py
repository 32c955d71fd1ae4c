"""A1111's built-in scripts through the gateway (`script_name`, `script_args` as A1111's API takes them), against a
real Triton server. Each script's pictures are checked against plain requests made with what A1111's script would
set (its published code: scripts/prompt_matrix.py, xyz_grid.py, loopback.py, sd_upscale.py), and the composed
pictures against A1111's layout written out here from the same code."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reference import sample_picture
from sdtrt.client import Client
from sdtrt.client.apps.a1111_alwayson import ALWAYSON
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.client.apps.a1111_scripts import SCRIPTS
from sdtrt.requests.grids import combine_tiles, split_tiles, tile_starts
from sdtrt.requests.infotext import parse_infotext

BASE = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7}


@pytest.fixture(scope="module")
def api(server):
    return TestClient(create_app(Client(server.url)))


@pytest.fixture(scope="module")
def direct(server):
    return Client(server.url)


def pictures(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text[:2000]
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in response.json()["images"]]


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def a1111_starts(length: int, tile: int, overlap: int) -> list[int]:
    """A1111's split_grid, one side: cols = ceil((w - overlap) / (tile - overlap)), dx = (w - tile) / (cols - 1),
    x = int(col * dx), clamped to w - tile."""
    cols = math.ceil((length - overlap) / (tile - overlap))
    dx = (length - tile) / (cols - 1) if cols > 1 else 0
    starts = [int(c * dx) for c in range(cols)]
    return [length - tile if x + tile >= length else x for x in starts]


def a1111_combined(size: tuple[int, int], tile: int, overlap: int, tiles: dict[tuple[int, int], np.ndarray]):
    """A1111's combine_grid in numpy: within a row each tile's first ``overlap`` columns fade in over what is
    there (weight i * 255 / overlap, as uint8, of 255), then the rest pasted; then the rows the same way."""
    width, height = size
    weights = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8).astype(np.float64) / 255
    out = np.zeros((height, width, 3))
    for y in a1111_starts(height, tile, overlap):
        row = np.zeros((tile, width, 3))
        for x in a1111_starts(width, tile, overlap):
            t = tiles[(x, y)].astype(np.float64)
            if x == 0:
                row[:, x:x + tile] = t
                continue
            row[:, x:x + overlap] = t[:, :overlap] * weights[None, :, None] + row[:, x:x + overlap] * (
                1 - weights[None, :, None])
            row[:, x + overlap:x + tile] = t[:, overlap:]
        if y == 0:
            out[y:y + tile] = row
            continue
        out[y:y + overlap] = row[:overlap] * weights[:, None, None] + out[y:y + overlap] * (1 - weights[:, None, None])
        out[y + overlap:y + tile] = row[overlap:]
    return out


def test_tiles_sit_where_a1111s_split_grid_puts_them_and_go_back_unchanged():
    for length, tile, overlap in [(128, 64, 16), (200, 64, 0), (64, 64, 8), (1000, 512, 64), (520, 512, 64)]:
        assert tile_starts(length, tile, overlap) == a1111_starts(length, tile, overlap), (length, tile, overlap)
    picture = Image.fromarray(sample_picture(160, 96))
    tiles = split_tiles(picture, 64, 64, 16)
    assert [x for x, _ in tiles.rows[0][1]] == a1111_starts(160, 64, 16)
    assert np.array_equal(np.asarray(combine_tiles(tiles, tiles.pictures)), np.asarray(picture))


def test_the_scripts_are_listed_and_one_sdtrt_lacks_is_refused_by_name(api):
    listed = api.get("/sdapi/v1/scripts").json()
    always = ["extra options", "Hypertile", "refiner", "sampler", "seed"]  # A1111's always-on ones follow
    assert listed == {"txt2img": ["prompt matrix", "x/y/z plot", *always],
                      "img2img": ["prompt matrix", "x/y/z plot", "loopback", "sd upscale", "extra options",
                                  "Hypertile", "soft inpainting", "refiner", "sampler", "seed"]}
    refused = api.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "Outpainting mk2"})
    assert refused.status_code == 422 and "prompt matrix, x/y/z plot" in refused.text
    refused = api.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "loopback"})  # an img2img script
    assert refused.status_code == 422 and "script_name" in refused.text


def test_prompt_matrix_draws_every_combination_with_one_seed(api, direct):
    response = api.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a fox|in snow|at night", "seed": 5,
                                                   "script_name": "Prompt matrix", "script_args": []})
    grid, *cells = pictures(response)
    expected = ["a fox", "a fox, in snow", "a fox, at night", "a fox, in snow, at night"]  # bit n: part n + 1
    assert len(cells) == 4
    for cell, prompt in zip(cells, expected):
        plain = direct.txt2img(prompt, seed=5, steps=2, width=64, height=64, sampler="Euler", guidance_scale=7,
                               k_diffusion=True)
        assert np.array_equal(np.asarray(cell), plain.images[0]), prompt
        assert cell.info["parameters"] == plain.infotexts[0]
    # 2 x 2 cells (rows: 1 << (parts // 2)), row labels to the left (3/4 of a cell), column labels on top
    pad_left, pad_top = 48, grid.height - 128
    assert grid.width == 128 + pad_left and pad_top > 0
    for i, cell in enumerate(cells):
        x, y = pad_left + 64 * (i % 2), pad_top + 64 * (i // 2)
        assert np.array_equal(np.asarray(grid)[y:y + 64, x:x + 64], np.asarray(cell)), i
    assert json.loads(response.json()["info"])["index_of_first_image"] == 1


def test_xyz_plot_by_a1111s_axis_indices_and_by_name(api, direct):
    # txt2img's axis list in A1111 1.10: 4 is Steps, 6 is CFG Scale; values as A1111 parses them ("2-3": a range)
    args = [4, "2-3", [], 6, "1, 7", [], 0, "", [], True, True, False]
    response = api.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a boat", "seed": 9, "script_name": "X/Y/Z plot",
                                                   "script_args": args})
    grid, *cells = pictures(response)
    assert len(cells) == 4 and grid.width > 128 and grid.height > 128
    for cell, (steps, cfg) in zip(cells, [(2, 1), (3, 1), (2, 7), (3, 7)]):  # x varies fastest
        plain = direct.txt2img("a boat", seed=9, steps=steps, guidance_scale=cfg, width=64, height=64,
                               sampler="Euler", k_diffusion=True)
        assert np.array_equal(np.asarray(cell), plain.images[0]), (steps, cfg)
    _, _, params = parse_infotext(grid.info["parameters"])
    assert params["Script"] == "X/Y/Z plot" and params["X Type"] == "Steps" and params["Y Values"] == "1, 7"
    by_name = api.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a boat", "seed": 9, "script_name": "x/y/z plot",
                                                  "script_args": ["Sampler", "", ["Euler", "DDIM"]] + [0, "", []] * 2
                                                  + [False, True]})
    _, *cells = pictures(by_name)
    ddim = direct.txt2img("a boat", seed=9, steps=2, guidance_scale=7, width=64, height=64, sampler="DDIM",
                          k_diffusion=True)  # (the gateway runs A1111's DDIM)
    assert len(cells) == 2 and np.array_equal(np.asarray(cells[1]), ddim.images[0])


def test_xyz_schedule_option_axes_set_a1111s_options(api, direct):
    """xyz_grid.py's option axes (apply_override): Schedule max sigma and the boolean SGM noise multiplier."""
    args = ["Schedule max sigma", "5, 10", [], "SGM noise multiplier", "", ["False", "True"], 0, "", [], False, True]
    _, *cells = pictures(api.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a boat", "seed": 5,
                                                            "scheduler": "Karras", "script_name": "X/Y/Z plot",
                                                            "script_args": args}))
    assert len(cells) == 4
    for cell, (sigma_max, sgm) in zip(cells, [(5, False), (10, False), (5, True), (10, True)]):
        plain = direct.txt2img("a boat", seed=5, steps=2, width=64, height=64, sampler="Euler", guidance_scale=7,
                               schedule_type="Karras", sigma_max=sigma_max, sgm_noise_multiplier=sgm, k_diffusion=True)
        assert np.array_equal(np.asarray(cell), plain.images[0]), (sigma_max, sgm)
        _, _, params = parse_infotext(cell.info["parameters"])
        assert params["Schedule max sigma"] == str(sigma_max) and ("SGM noise multiplier" in params) == sgm


def test_xyz_size_prompt_order_and_refiner_axes_as_a1111_applies_them(api, direct):
    """xyz_grid.py's apply_size (WIDTHxHEIGHT), apply_order (the tokens where they first appear, put back in each
    order) and the refiner's fields."""
    prompt = "a red boat, a blue sky, a green sea"
    args = ["Size", "64x64, 80x64", [], "Prompt order", "a red boat, a green sea", [], 0, "", [], False, True]
    _, *cells = pictures(api.post("/sdapi/v1/txt2img", json={**BASE, "prompt": prompt, "seed": 3,
                                                            "script_name": "X/Y/Z plot", "script_args": args}))
    expected = [(64, prompt), (80, prompt), (64, "a green sea, a blue sky, a red boat"),
                (80, "a green sea, a blue sky, a red boat")]
    assert len(cells) == 4
    for cell, (width, text) in zip(cells, expected):
        plain = direct.txt2img(text, seed=3, steps=2, width=width, height=64, sampler="Euler", guidance_scale=7,
                               k_diffusion=True)
        assert np.array_equal(np.asarray(cell), plain.images[0]), (width, text)
    model = api.get("/sdapi/v1/sd-models").json()[0]["title"]
    args = ["Refiner checkpoint", "", ["None", model], "Refiner switch at", "0.5", [], 0, "", [], False, True]
    response = api.post("/sdapi/v1/txt2img", json={**BASE, "seed": 3, "script_name": "X/Y/Z plot",
                                                   "script_args": args})
    assert len(pictures(response)) == 3
    bad = api.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "X/Y/Z plot",
                                              "script_args": ["Size", "64 by 64", []]})
    assert bad.status_code == 422 and "WIDTHxHEIGHT" in bad.text


def test_a_script_is_bounded_before_it_starts_and_its_arguments_are_checked(api):
    too_big = api.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "X/Y/Z plot",
                                                  "script_args": [1, "1-11", [], 1, "1-11", []]})
    assert too_big.status_code == 422 and "121 generations" in too_big.text
    missing = api.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "X/Y/Z plot",
                                                  "script_args": ["Token merging ratio", "0.1, 0.2", []]})
    assert missing.status_code == 422 and "not available" in missing.text and "Steps" in missing.text
    init = b64(Image.fromarray(sample_picture(64, 64)))
    loop = api.post("/sdapi/v1/img2img", json={**BASE, "init_images": [init], "script_name": "Loopback",
                                               "script_args": [40]})
    assert loop.status_code == 422 and "loops" in loop.text and "1 to 32" in loop.text


def test_loopback_feeds_each_picture_back_with_a1111s_strength_curve_and_seeds(api, direct):
    source = Image.fromarray(sample_picture(64, 64))
    response = api.post("/sdapi/v1/img2img", json={**BASE, "prompt": "a house", "seed": 11, "init_images": [b64(source)],
                                                   "denoising_strength": 0.75, "script_name": "Loopback",
                                                   "script_args": [3, 0.5, "Linear", "None"]})
    grid, *loops = pictures(response)
    assert len(loops) == 3 and grid.size == (192, 64)
    picture = source
    for i, (strength, seed) in enumerate([(0.75, 11), (0.625, 12), (0.5, 13)]):  # start + (final - start) * i/2
        plain = direct.img2img("a house", picture, seed=seed, denoising_strength=strength, steps=2, width=64,
                               height=64, sampler="Euler", guidance_scale=7, k_diffusion=True)
        assert np.array_equal(np.asarray(loops[i]), plain.images[0]), i
        picture = Image.fromarray(plain.images[0])
    _, _, params = parse_infotext(loops[2].info["parameters"])
    assert params["Denoising curve"] == "Linear" and params["Final denoising strength"] == "0.5"


def test_sd_upscale_redraws_each_tile_and_blends_them_as_a1111(api, direct):
    source = Image.fromarray(sample_picture(64, 64))
    response = api.post("/sdapi/v1/img2img", json={**BASE, "prompt": "a castle", "seed": 20, "init_images": [b64(source)],
                                                   "denoising_strength": 0.4, "script_name": "SD upscale",
                                                   "script_args": [None, 16, 1, 2]})  # 1: Lanczos (A1111's order)
    (result,) = pictures(response)
    assert result.size == (128, 128)
    big = source.resize((128, 128), Image.Resampling.LANCZOS)
    starts = a1111_starts(128, 64, 16)
    assert starts == [0, 32, 64]
    redrawn, seed = {}, 20
    for y in starts:  # tiles in rows, one per batch, the seed + 1 each batch
        for x in starts:
            plain = direct.img2img("a castle", big.crop((x, y, x + 64, y + 64)), seed=seed, denoising_strength=0.4,
                                   steps=2, width=64, height=64, sampler="Euler", guidance_scale=7, k_diffusion=True)
            redrawn[(x, y)], seed = plain.images[0], seed + 1
    expected = a1111_combined((128, 128), 64, 16, redrawn)
    assert np.abs(np.asarray(result).astype(np.float64) - expected).max() <= 1.0  # Pillow's mask rounding
    _, _, params = parse_infotext(result.info["parameters"])
    assert params["SD upscale upscaler"] == "Lanczos" and params["SD upscale overlap"] == "16"


def test_script_info_describes_each_script_and_its_arguments(server):
    """/sdapi/v1/script-info as A1111's ScriptInfo: each tab's scripts, each argument's label, default and range."""
    api = TestClient(create_app(Client(server.url)))
    info = api.get("/sdapi/v1/script-info").json()
    names = {(i["name"], i["is_img2img"]) for i in info}
    scripts = api.get("/sdapi/v1/scripts").json()
    # (Hypertile has no controls: A1111 lists it, but has no ScriptInfo for it)
    assert names == {(n, False) for n in scripts["txt2img"] if n != "Hypertile"} | \
        {(n, True) for n in scripts["img2img"] if n != "Hypertile"}
    loopback = next(i for i in info if i["name"] == "loopback")
    assert loopback["args"][0] == {"label": "Loops", "value": 4, "minimum": 1, "maximum": 32, "step": 1,
                                   "choices": None}
    xyz = next(i for i in info if i["name"] == "x/y/z plot" and not i["is_img2img"])
    assert len(xyz["args"]) == 18 and xyz["args"][16]["label"] == "Grid margins (px)"
    assert all(len(i["args"]) == len((SCRIPTS.get(i["name"]) or ALWAYSON[i["name"]]).defaults) for i in info)
    assert all(i["is_alwayson"] == (i["name"] in ALWAYSON) for i in info)
    seed = next(i for i in info if i["name"] == "seed" and i["is_img2img"])
    assert [a["label"] for a in seed["args"]] == ["Seed", "Extra", "Variation seed", "Variation strength",
                                                   "Resize seed from width", "Resize seed from height"]
    refiner = next(i for i in info if i["name"] == "refiner" and not i["is_img2img"])
    assert refiner["args"][1]["choices"] == [m["title"] for m in api.get("/sdapi/v1/sd-models").json()]


@pytest.mark.parametrize("value, restore, model", [("CodeFormer", True, "CodeFormer"), ("gfpgan", True, "GFPGAN"),
                                                   ("yes", True, None), ("False", False, None)])
def test_the_face_restore_axis_sets_restore_faces_as_a1111s_does(value, restore, model):
    from sdtrt.client.apps.a1111_requests import Txt2ImgBody
    from sdtrt.client.apps.a1111_scripts import AXES, apply_axis

    axis = next(a for a in AXES if a.label == "Face restore")
    body = apply_axis(Txt2ImgBody(prompt="x"), axis, value, [value])
    assert body.restore_faces is restore
    assert (body.override_settings or {}).get("face_restoration_model") == model
