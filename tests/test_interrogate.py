"""A1111's DeepBooru interrogator (`sdtrt export --interrogators DIR`): /sdapi/v1/interrogate and Loopback's
"Append interrogated prompt", served.

The file is a random-weight one in the layout of A1111's model-resnet_custom_v3.pt (n_Conv_0 ... n_Conv_178 and its
tags), at small widths. The reference is A1111 1.10's DeepDanbooruModel forward restated below block by block (its
TF-style pads, its shortcuts), with its tag_multi rules, on the picture diffusers' "fill" resize (A1111's resize
mode 2, which diffusers took from it) makes."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

from reference import sample_picture
from servers import triton_on
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app

# A1111's blocks: (1x1, 3x3, 1x1, the shortcut's conv or None), in its forward's order
BLOCKS = ([(2, 3, 4, 1), (5, 6, 7, None), (8, 9, 10, None), (12, 13, 14, 11)]
          + [(i, i + 1, i + 2, None) for i in range(15, 36, 3)] + [(37, 38, 39, 36)]
          + [(i, i + 1, i + 2, None) for i in range(40, 97, 3)] + [(97, 98, 99, 100)]
          + [(i, i + 1, i + 2, None) for i in range(101, 158, 3)] + [(159, 160, 161, 158), (162, 163, 164, None),
                                                                      (165, 166, 167, None), (169, 170, 171, 168),
                                                                      (172, 173, 174, None), (175, 176, 177, None)])
STRIDE_2 = {0, 11, 13, 36, 38, 98, 100, 158, 160, 168, 170}
TAGS = ["1girl", "long_hair", "smile(happy)", "rating:safe", "blue_sky", "red_eyes", "outdoors", "cat_ears",
        "short_hair", "no_humans", "back\\slash", "tree"]


def tiny_state(seed: int = 3) -> dict:
    """A1111's layout at 1/16 of its widths (stem 4, stages (mid, out) as below), 12 tags; the head scaled so that
    each tag's probability is far from the threshold."""
    torch.manual_seed(seed)
    stages = [(4, 16), (8, 32), (8, 32), (16, 64), (16, 64)]  # (A1111: 64/256, 128/512, 256/1024, 512/2048, 1024/4096)
    shapes = {0: (4, 3, 7)}
    stage_of = [0] * 11 + [1] * 25 + [2] * 122 + [3] * 10 + [4] * 11  # conv index -> its stage
    out_of = {s: o for s, (_, o) in enumerate(stages)}
    last_out = 4
    for a, b, c, shortcut in BLOCKS:
        mid, out = stages[stage_of[a]]
        shapes[a], shapes[b], shapes[c] = (mid, last_out, 1), (mid, mid, 3), (out, mid, 1)
        if shortcut is not None:
            shapes[shortcut] = (out, last_out, 1)
        last_out = out_of[stage_of[a]]
    shapes[178] = (len(TAGS), last_out, 1)
    state = {}
    for i, (out, inp, k) in sorted(shapes.items()):
        state[f"n_Conv_{i}.weight"] = torch.randn(out, inp, k, k) * (2.0 / (inp * k * k)) ** 0.5
        if i != 178:
            state[f"n_Conv_{i}.bias"] = torch.randn(out) * 0.01
    state["n_Conv_178.weight"] *= 40
    state["tags"] = list(TAGS)
    return state


def a1111_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    def conv(i, t):
        return F.conv2d(t, state[f"n_Conv_{i}.weight"], state.get(f"n_Conv_{i}.bias"), stride=2 if i in STRIDE_2 else 1)

    t = x.permute(0, 3, 1, 2)
    t = F.relu(conv(0, F.pad(t, [2, 3, 2, 3], value=0)))
    t = F.max_pool2d(F.pad(t, [0, 1, 0, 1], value=float("-inf")), kernel_size=(3, 3), stride=(2, 2))
    for a, b, c, shortcut in BLOCKS:
        side = conv(shortcut, t) if shortcut is not None else t
        u = F.relu(conv(a, t))
        u = F.relu(conv(b, F.pad(u, [0, 1, 0, 1] if b in STRIDE_2 else [1, 1, 1, 1], value=0)))
        t = F.relu(torch.add(conv(c, u), side))
    t = conv(178, t)
    return torch.sigmoid(torch.squeeze(torch.squeeze(F.avg_pool2d(t, kernel_size=t.shape[-2:]), 3), 2))


def a1111_tags(state: dict, picture: Image.Image, threshold=0.5, sort_alpha=True, use_spaces=True, escape=True,
               ranks=False, filter_tags="") -> str:
    from diffusers.image_processor import VaeImageProcessor

    pic = VaeImageProcessor(resample="lanczos")._resize_and_fill(picture.convert("RGB"), 512, 512)
    a = np.expand_dims(np.array(pic, dtype=np.float32), 0) / 255
    with torch.no_grad():
        y = a1111_forward(state, torch.from_numpy(a))[0].numpy()
    found = {tag: p for tag, p in zip(state["tags"], y) if p >= threshold and not tag.startswith("rating:")}
    tags = sorted(found) if sort_alpha else [t for t, _ in sorted(found.items(), key=lambda x: -x[1])]
    dropped = {x.strip().replace(" ", "_") for x in filter_tags.split(",")}
    res = []
    for tag in [t for t in tags if t not in dropped]:
        out = tag.replace("_", " ") if use_spaces else tag
        out = re.sub(re.compile(r"([\\()])"), r"\\\1", out) if escape else out
        res.append(f"({out}:{found[tag]:.3f})" if ranks else out)
    return ", ".join(res)


@pytest.fixture(scope="module")
def state():
    return tiny_state()


@pytest.fixture(scope="module")
def repo(export_default, state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepbooru")
    torch.save(state, str(folder / "model-resnet_custom_v3.pt"))
    return export_default("interrogator-repo", interrogator_dir=folder)


def _png(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_caption_is_a1111s_and_loopback_appends_it(repo, state, tmp_path):
    wide, tall = Image.fromarray(sample_picture(96, 64)), Image.fromarray(sample_picture(48, 80))
    with triton_on(repo, tmp_path) as triton:
        client = Client(triton.url)
        assert list(client.interrogators()) == ["deepdanbooru"]
        api = TestClient(create_app(client))
        for picture in (wide, tall):
            response = api.post("/sdapi/v1/interrogate", json={"image": _png(picture), "model": "deepdanbooru"})
            assert response.status_code == 200, response.text[:500]
            expected = a1111_tags(state, picture)
            assert response.json() == {"caption": expected} and expected.count(",") >= 2, expected
        options = {"interrogate_return_ranks": True, "deepbooru_sort_alpha": False, "deepbooru_use_spaces": False,
                   "deepbooru_filter_tags": "tree, red eyes"}
        assert api.post("/sdapi/v1/options", json=options).status_code == 200
        ranked = api.post("/sdapi/v1/interrogate", json={"image": _png(wide), "model": "deepdanbooru"}).json()
        assert ranked["caption"] == a1111_tags(state, wide, sort_alpha=False, use_spaces=False, ranks=True,
                                               filter_tags="tree, red eyes")
        refused = api.post("/sdapi/v1/interrogate", json={"image": _png(wide), "model": "clip"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "model"]
        for bad in ({"model": "deepdanbooru"}, {"image": "not base64!", "model": "deepdanbooru"}):
            refused = api.post("/sdapi/v1/interrogate", json=bad)
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "image"], refused.text
        assert api.post("/sdapi/v1/interrogate", json={"image": _png(tall), "model": "deepdanbooru"}).status_code == 200
        body = {"prompt": "a castle", "seed": 5, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
                "init_images": [_png(wide.resize((64, 64)))], "denoising_strength": 0.5, "script_name": "loopback",
                "script_args": [2, 0.4, "Linear", "DeepBooru"]}
        assert api.post("/sdapi/v1/options", json={"interrogate_return_ranks": False}).status_code == 200
        looped = api.post("/sdapi/v1/img2img", json=body)
        assert looped.status_code == 200, looped.text[:500]
        infotexts = json.loads(looped.json()["info"])["infotexts"]
        first = a1111_tags(state, wide.resize((64, 64)), sort_alpha=False, use_spaces=False,
                           filter_tags="tree, red eyes")
        assert infotexts[1].startswith(f"a castle, {first}\n")  # (the grid first, then each loop's picture)


def test_a_wrong_file_is_named(default_model, tmp_path):
    from sdtrt.contract.errors import UsageError
    from sdtrt.export import export_model

    folder = tmp_path / "deepbooru"
    folder.mkdir()
    torch.save({"weight": torch.zeros(2)}, str(folder / "model.pt"))
    with pytest.raises(UsageError, match="model.pt: neither A1111's DeepBooru"):
        export_model(default_model, tmp_path / "repo", progress=False, report=lambda *_: None, interrogator_dir=folder)


def test_the_tags_are_written_as_a1111_writes_them():
    """Threshold, rating: left out, sorted by name or by probability, filtered, spaces, escapes, ranks."""
    from sdtrt.postprocessing.interrogate import DeepBooruOptions, deepbooru_tags

    tags = ["b_tag", "a(1)", "rating:safe", "low", "c\\d", "tree"]
    probabilities = np.array([[0.9, 0.6, 0.99, 0.2, 0.5, 0.7]], dtype=np.float32)
    picture = Image.fromarray(sample_picture(40, 30))
    seen = []

    def run(array: np.ndarray) -> np.ndarray:
        seen.append(array)
        return probabilities

    assert deepbooru_tags(picture, run, tags) == "a\\(1\\), b tag, c\\\\d, tree"
    ranked = DeepBooruOptions(sort_alpha=False, ranks=True, use_spaces=False, escape=False, filter_tags="tree, x")
    assert deepbooru_tags(picture, run, tags, ranked) == "(b_tag:0.900), (a(1):0.600), (c\\d:0.500)"
    from diffusers.image_processor import VaeImageProcessor

    filled = VaeImageProcessor(resample="lanczos")._resize_and_fill(picture, 512, 512)
    assert seen[0].shape == (1, 512, 512, 3) and np.array_equal(seen[0][0], np.asarray(filled, np.float32) / 255)


def test_its_tensorrt_profile_is_one_fixed_picture(repo):
    """On a GPU the engine takes one 512 px picture (Triton never batches it)."""
    from sdtrt.export.tensorrt import EngineOptions, profile_shapes
    from sdtrt.model_repository.configs import engine_batching
    from sdtrt.pipeline.local import LocalPipeline

    spec = LocalPipeline(repo).spec
    component = spec.component("interrogator_deepdanbooru")
    profile = profile_shapes(spec, component, EngineOptions())
    assert profile == {"image": [(1, 512, 512, 3)] * 3}
    assert engine_batching(spec, component, profile).max_batch_size == 0
