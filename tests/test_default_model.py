"""The embedded default model: an ordinary, reproducible diffusers folder with CLIP's real tokenizer."""

from __future__ import annotations

from sdtrt.pipeline.default_model import build_default_model, weights_digest


def test_build_is_byte_identical(default_model, tmp_path):
    again = build_default_model(tmp_path / "again")
    first, second = weights_digest(default_model), weights_digest(again)
    assert set(first) == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert first == second


def test_loads_as_a_plain_diffusers_pipeline(default_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True)
    assert pipe.unet.config.in_channels == 4
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"


def test_tokenizer_has_clips_real_ids_and_pads_to_77(default_model):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(default_model / "tokenizer"))
    ids = tok("a photograph of an astronaut riding a horse", padding="max_length", truncation=True).input_ids
    # The ids every SD 1.x checkpoint sees for this prompt (OpenAI CLIP ViT-L/14 vocabulary).
    assert ids[:10] == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert len(ids) == 77 and ids[10:] == [49407] * 67
    long = tok(" ".join(["cat"] * 200), padding="max_length", truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407
    assert len(tok.get_vocab()) == 49408


def test_sd15_shapes_have_sd15_parameter_counts():
    """The benchmark model is SD 1.5-sized: built on the meta device here, so no weights are allocated."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtrt.pipeline.default_model import model_configs

    configs = model_configs("sd15")
    with init_empty_weights():
        unet = UNet2DConditionModel(**configs["unet"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text"]))
        vae = AutoencoderKL(**configs["vae"])
    millions = [round(sum(p.numel() for p in m.parameters()) / 1e6) for m in (unet, text, vae)]
    assert millions == [860, 123, 84]  # SD 1.5's U-Net, CLIP ViT-L/14 text model, VAE


def test_init_default_writes_the_trained_controlnet_beside_the_model(tmp_path):
    """`sdtrt init-default --controlnets DIR` copies the shipped canny ControlNet (a whole file, by its temporary
    name and a rename); it belongs to the shapes model, so another size is refused naming why."""
    from sdtrt.client.apps.cli import main as cli
    from sdtrt.pipeline.default_model import SHAPES_CONTROLNET_WEIGHTS

    folder = tmp_path / "ControlNet"
    assert cli(["init-default", "--out", str(tmp_path / "shapes"), "--controlnets", str(folder)]) == 0
    assert [p.name for p in folder.iterdir()] == ["shapes_canny.safetensors"]
    assert (folder / "shapes_canny.safetensors").read_bytes() == SHAPES_CONTROLNET_WEIGHTS.read_bytes()
    assert cli(["init-default", "--out", str(tmp_path / "tiny"), "--size", "tiny", "--controlnets", str(folder)]) == 2
