"""LoRAs fused at export: the exported networks give diffusers' image with the same LoRA loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loras import make_lora
from reference import MAX_PIXEL_DIFF, max_diff, reference_scheduler
from sdtrt.request import Txt2ImgRequest


@pytest.fixture(scope="module")
def lora_file(default_model, tmp_path_factory):
    """A LoRA on the U-Net's attention projections, made with peft and saved as diffusers saves LoRAs."""
    return make_lora(default_model, tmp_path_factory.mktemp("lora"))


def test_fused_lora_export_matches_diffusers_with_the_lora(default_model, lora_file, local_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtrt.export import export_model
    from sdtrt.local import LocalPipeline

    spec = export_model(default_model, tmp_path / "repo", loras=(f"{lora_file}:0.8",), progress=False,
                        report=lambda *_: None)
    assert spec.model_name == "default" and spec.source_hash != local_pipeline.spec.source_hash
    assert [(lora["name"], lora["scale"]) for lora in spec.extra["loras"]] == [("lora7", 0.8)]
    request = Txt2ImgRequest(prompt="a castle", sampler="Euler", steps=6, seed=3, width=64, height=64)
    with_lora = LocalPipeline(tmp_path / "repo").txt2img(request)

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.scheduler = reference_scheduler("Euler", pipe.scheduler.config, 3)
    expected = pipe("a castle", num_inference_steps=6, guidance_scale=7.0, width=64, height=64, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(3)).images
    assert max_diff(with_lora.images, (expected * 255).round().astype(np.uint8)) <= MAX_PIXEL_DIFF
    assert max_diff(with_lora.images, local_pipeline.txt2img(request).images) > MAX_PIXEL_DIFF
    lora_hash = spec.extra["loras"][0]["sha256"][:12]
    assert f'Model hash: {spec.model_hash}, Model: default, RNG: CPU, Lora hashes: "lora7: {lora_hash}"' in \
        with_lora.infotexts[0]


def test_missing_lora_file_is_named(capsys, default_model, tmp_path):
    from sdtrt.app.cli import main

    code = main(["export", str(default_model), "--out", str(tmp_path / "r"), "--lora", str(tmp_path / "nope.safetensors")])
    assert code == 2 and "nope.safetensors: no such file" in capsys.readouterr().err


def test_lora_fused_export_has_the_plain_exports_weight_names(default_model, lora_file, exported_repo, tmp_path):
    """Refit swaps weights into a TensorRT engine by ONNX initializer name, so a LoRA-fused export must have
    exactly the plain export's initializers (names, shapes, dtypes), with some of their values changed."""
    import onnx
    from onnx import numpy_helper

    from sdtrt.export import export_model

    export_model(default_model, tmp_path / "lora", loras=(f"{lora_file}:0.8",), progress=False, report=lambda *_: None)
    for name in ("unet", "text_encoder", "vae_decoder", "vae_encoder"):
        plain = onnx.load(str(exported_repo / f"default__{name}" / "1" / "model.onnx")).graph.initializer
        fused = onnx.load(str(tmp_path / "lora" / f"default__{name}" / "1" / "model.onnx")).graph.initializer
        signature = lambda inits: sorted((i.name, tuple(i.dims), i.data_type) for i in inits)  # noqa: E731
        assert signature(fused) == signature(plain), name
        if name == "unet":  # the LoRA is on the U-Net's attention: those weights, and only the U-Net's, changed
            before = {i.name: numpy_helper.to_array(i) for i in plain}
            changed = [i.name for i in fused if not np.array_equal(numpy_helper.to_array(i), before[i.name])]
            assert changed, "the fused LoRA changed no U-Net weight"
