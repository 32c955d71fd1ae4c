"""LoRAs fused at export: the exported networks give diffusers' image with the same LoRA loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import MAX_PIXEL_DIFF, max_diff, reference_scheduler
from sdtrt.request import Txt2ImgRequest


@pytest.fixture(scope="module")
def lora_file(default_model, tmp_path_factory):
    """A LoRA on the U-Net's attention projections, made with peft and saved as diffusers saves LoRAs."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True)
    torch.manual_seed(7)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))  # random B: the LoRA really changes the output
    out = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              weight_name="style.safetensors")
    return out / "style.safetensors"


def test_fused_lora_export_matches_diffusers_with_the_lora(default_model, lora_file, local_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtrt.export import export_model
    from sdtrt.local import LocalPipeline

    spec = export_model(default_model, tmp_path / "repo", loras=(f"{lora_file}:0.8",), progress=False,
                        report=lambda *_: None)
    assert spec.model_name == "default" and spec.source_hash != local_pipeline.spec.source_hash
    assert [(lora["name"], lora["scale"]) for lora in spec.extra["loras"]] == [("style", 0.8)]
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
    assert f'Model hash: {spec.model_hash}, Model: default, Lora hashes: "style: {lora_hash}"' in with_lora.infotexts[0]


def test_missing_lora_file_is_named(capsys, default_model, tmp_path):
    from sdtrt.cli import main

    code = main(["export", str(default_model), "--out", str(tmp_path / "r"), "--lora", str(tmp_path / "nope.safetensors")])
    assert code == 2 and "nope.safetensors: no such file" in capsys.readouterr().err
