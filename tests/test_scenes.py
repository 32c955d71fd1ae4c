"""The default model's training data (sdtrt.pipeline.scenes) and its training script, end to end at a few steps.

The scenes must be what their captions say (the semantic tests will read pictures the same way) and the same
for the same seed; the script must write weights that `build_default_model(size="shapes")` turns into a
diffusers folder sdtrt exports.
"""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sdtrt.pipeline.scenes import COLOURS, PLACES, SIZE, Scene, colour_share, dataset, random_caption

ROOT = Path(__file__).resolve().parents[1]


def test_a_scene_is_what_its_caption_says():
    scene = Scene(shape="circle", colour="red", size="large", place="at the top left", background="blue")
    picture = scene.render()
    assert picture.shape == (SIZE, SIZE, 3) and picture.dtype == np.uint8
    assert scene.caption() == "a large red circle at the top left on a blue background"
    assert colour_share(picture, "red", scene.mask()) == 1.0
    assert colour_share(picture, "blue", ~scene.mask()) == 1.0
    x, y = PLACES["at the top left"]
    assert scene.mask()[y, x] and not scene.mask()[SIZE - y, SIZE - x]
    assert scene.caption(frozenset({"size", "place"})) == "a red circle on a blue background"


def test_the_data_is_the_same_for_the_same_seed_and_varied():
    pictures, scenes = dataset(200, seed=7)
    again, _ = dataset(200, seed=7)
    assert (pictures == again).all()
    assert {s.shape for s in scenes} == {"circle", "square", "triangle"}
    assert {s.colour for s in scenes} == set(COLOURS) and {s.place for s in scenes} == set(PLACES)
    assert all(s.colour != s.background for s in scenes)
    captions = [random_caption(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    assert "" in captions and any("background" not in c and c for c in captions)  # parts left out, some empty


@pytest.mark.slow  # trains and exports a model
def test_the_training_script_writes_weights_that_export(tmp_path):
    weights = tmp_path / "shapes.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--out", str(weights),
                    "--vae-steps", "2", "--vae-batch", "2", "--denoiser-steps", "2", "--denoiser-batch", "4",
                    "--scenes", "16"], check=True, env=env, capture_output=True, timeout=600)
    from safetensors import safe_open

    from sdtrt.pipeline.default_model import build_default_model
    from sdtrt.export import export_model

    with safe_open(str(weights), "pt") as f:
        assert "--denoiser-steps 2" in f.metadata()["command"] and float(f.metadata()["vae_scaling_factor"]) > 0
    model = build_default_model(tmp_path / "model", size="shapes", weights=weights)
    spec = export_model(model, tmp_path / "repo", progress=False, report=lambda *_: None)
    assert spec.field("width").default == SIZE  # the model's native size is what it was trained at
