"""ONNX export: each component checks out with onnx.checker and matches its torch module in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdtrt.export.networks.descriptors import BATCH, CONTEXT, LATENT_H, LATENT_W, TEXT_BATCH, UNET_BATCH, descriptors
from sdtrt.contract.spec import SPEC_FILENAME, SPEC_VERSION, load_spec

SHAPES = [  # square, non-square, odd latent sizes, two prompt chunks, several images
    {BATCH: 1, TEXT_BATCH: 1, UNET_BATCH: 2, LATENT_H: 8, LATENT_W: 8, CONTEXT: 77},
    {BATCH: 2, TEXT_BATCH: 4, UNET_BATCH: 4, LATENT_H: 12, LATENT_W: 8, CONTEXT: 154},
    {BATCH: 1, TEXT_BATCH: 6, UNET_BATCH: 1, LATENT_H: 13, LATENT_W: 9, CONTEXT: 77},
]


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_onnx_matches_torch(name, exported_repo, diffusers_pipe):
    spec = load_spec(exported_repo)
    component = spec.component(name)
    path = exported_repo / component.onnx
    onnx.checker.check_model(str(path), full_check=True)
    desc = next(d for d in descriptors(diffusers_pipe, spec.text_max_length) if d.name == name)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [t.name for t in component.inputs]
    assert [o.name for o in session.get_outputs()] == [t.name for t in component.outputs]
    for dims in SHAPES:
        torch.manual_seed(1)
        inputs = desc.make_inputs(dims)
        with torch.no_grad():
            expected = desc.module(*inputs).numpy()
        actual = session.run(None, {t.name: x.numpy() for t, x in zip(component.inputs, inputs)})[0]
        assert actual.shape == expected.shape
        assert np.abs(actual - expected).max() < 1e-4, dims


def test_spec_records_the_models_facts(exported_repo, default_model):
    catalog = json.loads((exported_repo / SPEC_FILENAME).read_text())
    assert catalog["spec_version"] == SPEC_VERSION and catalog["default"] == "default" and list(catalog["models"]) == ["default"]
    raw = catalog["models"]["default"]
    spec = load_spec(exported_repo)
    assert spec.key == "default" and spec.triton_name("unet") == "default__unet"
    assert spec.latent_channels == 4 and spec.vae_scale_factor == 8
    assert spec.vae_scaling_factor == pytest.approx(0.18215)
    assert spec.prediction_type == "epsilon"
    assert spec.scheduler_config["beta_schedule"] == "scaled_linear"
    assert spec.text_max_length == 77 and spec.text_hidden_size == 32
    assert len(spec.source_hash) == 64 and spec.model_hash == spec.source_hash[:10]
    assert spec.component("unet").input("timestep").shape == ("unet_batch",)
    assert spec.component("text_encoder").input("input_ids").dtype == "int32"
    assert spec.dims["latent_height"].max == 1024 // 8 and spec.dims["context_length"].max == 3 * 77
    width = spec.field("width")
    assert (width.default, width.minimum, width.maximum, width.multiple_of) == (512, 64, 1024, 8)
    assert "Euler a" in spec.field("sampler").choices
    # which schedule types each sampler takes, worked out from diffusers once, here, for every reader of the spec
    assert spec.schedules["DPM++ 2M"] == ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential",
                                          "SGM Uniform", "Beta"]
    assert spec.schedules["Euler a"] == ["Automatic", "Uniform", "SGM Uniform"]
    assert len(spec.schedules["Euler"]) == 12 and "Uniform" not in spec.schedules["LCM"]  # LCM ignores spacings
    assert set(spec.schedules) == set(raw["schedules"])
    assert spec.align_your_steps[0] == 14.615 and len(spec.align_your_steps) == 11  # SD 1.5's levels
    for component in spec.components.values():
        assert (exported_repo / component.onnx).is_file()


def test_the_same_export_twice_is_a_no_op_and_says_so(default_model, tmp_path):
    from sdtrt.export import export_model

    export_model(default_model, tmp_path / "repo", progress=False, report=lambda *_: None)
    spec_file = tmp_path / "repo" / SPEC_FILENAME
    before = spec_file.stat().st_mtime_ns
    lines: list[str] = []
    spec = export_model(default_model, tmp_path / "repo", progress=False, report=lines.append)
    assert len(lines) == 1 and "already exported from the same inputs" in lines[0]
    assert spec_file.stat().st_mtime_ns == before and spec.extra["export_key"] == load_spec(tmp_path / "repo").extra["export_key"]
    lines.clear()
    export_model(default_model, tmp_path / "repo", max_batch=2, progress=False, report=lines.append)  # other inputs
    assert not any("already exported" in line for line in lines) and load_spec(tmp_path / "repo").dims["batch"].max == 2


def interrupted_export(model, out, *flags) -> None:
    """`sdtrt export`, killed (SIGKILL) once its first network is written."""
    import signal
    import subprocess
    import sys

    run = subprocess.Popen([sys.executable, "-m", "sdtrt", "export", str(model), "--out", str(out), *flags],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in run.stdout:
        if line.startswith("text_encoder:"):
            run.send_signal(signal.SIGKILL)
            break
    run.wait()
    assert run.returncode == -signal.SIGKILL


def test_an_interrupted_export_never_leaves_a_repository_that_looks_complete(default_model, tmp_path):
    interrupted_export(default_model, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # the work was beside it, under a hidden name
    from sdtrt.export import export_model

    spec = export_model(default_model, tmp_path / "kept", progress=False, report=lambda *_: None)
    files = {p.relative_to(tmp_path / "kept"): p.read_bytes() for p in (tmp_path / "kept").rglob("*") if p.is_file()}
    interrupted_export(default_model, tmp_path / "kept", "--max-batch", "2")
    assert {p.relative_to(tmp_path / "kept"): p.read_bytes()
            for p in (tmp_path / "kept").rglob("*") if p.is_file()} == files
    assert load_spec(tmp_path / "kept").extra["export_key"] == spec.extra["export_key"]
