"""The embedded default models: small Stable-Diffusion-shaped diffusers pipelines built offline.

Same architecture family and wiring as SD 1.x (CLIP text model with CLIP's real tokenizer, a cross-attention
U-Net with 4 latent channels, a 4-level VAE so 8 pixels per latent cell, SD 1.x's scheduler config), but tiny.
"shapes" (what `sdtrt init-default` writes) is the model scripts/train_default_model.py trained on sdtrt.pipeline.scenes:
it draws coloured shapes on coloured backgrounds where the prompt says, at 64x64, loaded from its committed weights
file. "tiny" (the tests' model, and init-default's for inpainting and SD 2.x) has random weights from a fixed seed:
it builds in a second, byte-identically every time, and draws abstract patterns. "half" and "sd15" are SD 1.5's
layout at half and full widths, random, for benchmarks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdtrt.contract.architectures import SCHEDULER, SD1, SD2, SDXL_SCHEDULER
from sdtrt.contract.errors import UsageError
from sdtrt.pipeline.clip_vocab import write_clip_tokenizer
from sdtrt.pipeline.scenes import (
    SIZE as SCENE_SIZE,  # the shapes model's native size is the size of what it was trained on
)

SEED = 20241125

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=1,  # CLIP's head size is 64: a tiny hidden size has one head (single files infer it so)
    num_hidden_layers=2,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=64,  # latent cells, so 512 px native, like SD 1.x
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

VAE_CONFIG = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=32,
    scaling_factor=0.18215,
)


# The trained default model ("shapes": scripts/train_default_model.py on sdtrt.pipeline.scenes): 64 px native (8x8
# latents), a three-level U-Net so that every latent cell sees the whole picture (where the shape is matters).
SHAPES_SEED = 20261127
SHAPES_CONFIGS = {
    "text": dict(TEXT_CONFIG),
    "unet": {**UNET_CONFIG, "sample_size": SCENE_SIZE // 8, "block_out_channels": (32, 64, 64), "attention_head_dim": 1,
             "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
    "vae": {**VAE_CONFIG, "sample_size": SCENE_SIZE, "block_out_channels": (16, 32, 32, 32), "norm_num_groups": 16},
}

# SD 1.5's real shapes (UNet ~860M, CLIP ViT-L/14 text ~123M, VAE ~84M parameters), for benchmarks on a GPU when
# no checkpoint is at hand: same cost per step as SD 1.5, random weights from the same fixed seed.
SD15_SHAPES = {
    "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768),
    "unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
}
# SD 1.5's layout (the same blocks, layers, heads and attention) at half its widths: ~1/4 of its cost per step,
# for CPU benchmarks of an SD-shaped model that finish in minutes, not hours.
HALF_SD15_SHAPES = {
    "text": dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=12,
                 projection_dim=384),
    "unet": {**SD15_SHAPES["unet"], "block_out_channels": (160, 320, 640, 640), "cross_attention_dim": 384},
    "vae": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2),
}
SIZES = ("tiny", "half", "sd15", "shapes")
# The shapes model's canny ControlNet (scripts/train_default_controlnet.py): its hint encoder narrower than
# diffusers' default (16, 32, 96, 256), which would be as large as the rest of this small ControlNet.
SHAPES_CONTROLNET_CONFIG = {"conditioning_embedding_out_channels": (16, 32, 64, 64)}
SHAPES_CONTROLNET_WEIGHTS = Path(__file__).parent / "weights" / "shapes_canny.safetensors"

# The trained weights of the "shapes" model, as scripts/train_default_model.py wrote them (float16, a few MB).
SHAPES_WEIGHTS = Path(__file__).parent / "weights" / "shapes.safetensors"

# The tiny model in SD 2.x's architecture (OpenCLIP-style text tower: GELU, 23 layers read as SD 2.x reads them;
# U-Net heads of size 64, linear projections; v-prediction as the 768-v models), for testing that family.
SD2_TINY = {
    "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=23,
                 projection_dim=64, hidden_act="gelu", pad_token_id=0),
    "unet": dict(cross_attention_dim=64, use_linear_projection=True, attention_head_dim=[1, 1]),
    "vae": {},
}
# The tiny model in SDXL's architecture: two text encoders (CLIP-style, read at the penultimate layer, and an
# OpenCLIP-style one with a projection whose pooled output conditions the U-Net), a U-Net with SDXL's added
# conditions (pooled text + size/crop time ids), 1024 px native, EulerDiscrete as SDXL base ships.
SDXL_TINY = {
    "text_2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=3,
                   projection_dim=32, hidden_act="gelu", pad_token_id=0),
    "unet": dict(sample_size=128, cross_attention_dim=32 + 64, use_linear_projection=True, attention_head_dim=[1, 1],
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8),
    "vae": dict(scaling_factor=0.13025, force_upcast=True),
}
# SDXL base's U-Net at its real shapes (2.6 B parameters), for counting, not for running here.
SDXL_UNET_SHAPES = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
FAMILIES = ("sd1", "sd2", "sdxl")


def model_configs(size: str = "tiny", inpainting: bool = False, family: str = "sd1") -> dict[str, dict]:
    """The text/unet/vae constructor arguments of the default model, tiny or at SD 1.5's shapes, SD 1.x or
    (tiny only) SD 2.x."""
    if size not in SIZES or family not in FAMILIES or (family != "sd1" and size != "tiny"):
        raise ValueError(f"size must be one of {SIZES} and family one of {FAMILIES} (sd2, sdxl: tiny only)")
    if size == "shapes":
        if inpainting or family != "sd1":
            raise ValueError("the trained shapes model is SD 1.x-shaped text-to-image only")
        return {name: dict(config) for name, config in SHAPES_CONFIGS.items()}
    scaled = {"sd15": SD15_SHAPES, "half": HALF_SD15_SHAPES}.get(size) or {"sd2": SD2_TINY, "sdxl": SDXL_TINY}.get(family) or {}
    configs = {
        "text": {**TEXT_CONFIG, **scaled.get("text", {})},
        "unet": {**UNET_CONFIG, **scaled.get("unet", {}), **({"in_channels": 9} if inpainting else {})},
        "vae": {**VAE_CONFIG, **scaled.get("vae", {})},
    }
    if "text_2" in scaled:
        configs["text_2"] = {**TEXT_CONFIG, **scaled["text_2"]}
    return configs


def build_default_model(out_dir: str | Path, clip_bpe: str | Path | None = None, inpainting: bool = False,
                        size: str = "tiny", family: str = "sd1", weights: str | Path = SHAPES_WEIGHTS) -> Path:
    """Write the default model as an ordinary diffusers folder and return its path.

    ``inpainting`` gives its U-Net the 9 input channels of SD inpainting checkpoints (latents, mask,
    masked-image latents), for testing that path; ``size="sd15"`` scales it to SD 1.5's real shapes;
    ``family="sd2"`` builds it in SD 2.x's architecture, v-prediction; ``family="sdxl"`` in SDXL base's;
    ``size="shapes"``: the trained model, from ``weights``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = Path(out_dir)
    write_clip_tokenizer(out / "tokenizer", clip_bpe, pad_token=(SD2 if family == "sd2" else SD1).pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))

    # Each component gets its own fixed seed so that changing one config leaves the others' weights alone.
    configs = model_configs(size, inpainting, family)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text"])).eval()
    _trained_like_layer_norms(text_encoder)
    torch.manual_seed(SEED + 1)
    unet = UNet2DConditionModel(**configs["unet"]).eval()
    torch.manual_seed(SEED + 2)
    vae = AutoencoderKL(**configs["vae"]).eval()
    prediction_type = "v_prediction" if family == "sd2" else "epsilon"
    if size == "shapes":
        prediction_type = load_trained(text_encoder, unet, vae, Path(weights))

    if family == "sdxl":
        return _save_sdxl(out, configs, tokenizer, text_encoder, unet, vae, clip_bpe)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        # from_config keeps clip_sample for DDIM
        scheduler=PNDMScheduler.from_config({**SCHEDULER, "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


# The trained weights file: each network's tensors under its prefix, in float16; the VAE's latent scale and what
# the U-Net predicts in the metadata.
SHAPES_PARTS = ("text_encoder", "unet", "vae")


def save_trained(path: Path, states: dict, scaling: float, prediction_type: str, **metadata: str) -> None:
    """Write the networks' ``states`` (one state dict per part of SHAPES_PARTS) as the trained weights file."""
    tensors = {f"{part}.{name}": value.detach().to(torch.float16).contiguous()
               for part in SHAPES_PARTS for name, value in states[part].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"vae_scaling_factor": repr(scaling), "prediction_type": prediction_type,
                                            **metadata})


def load_trained(text_encoder, unet, vae, weights: Path = SHAPES_WEIGHTS) -> str:
    """The trained shapes model's weights (and its VAE's latent scale) into freshly built networks; returns what
    its U-Net predicts (the scheduler's prediction_type)."""
    if not weights.is_file():
        raise UsageError(f"{weights} is missing: train it with scripts/train_default_model.py --out {weights}")
    with safe_open(str(weights), "pt") as f:
        tensors = {key: f.get_tensor(key).float() for key in f.keys()}
        scaling = float(f.metadata()["vae_scaling_factor"])
        prediction_type = f.metadata().get("prediction_type", "epsilon")
    for prefix, module in zip(SHAPES_PARTS, (text_encoder, unet, vae)):
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    vae.register_to_config(scaling_factor=scaling)
    return prediction_type


def _save_sdxl(out: Path, configs: dict, tokenizer, text_encoder, unet, vae, clip_bpe) -> Path:
    write_clip_tokenizer(out / "tokenizer_2", clip_bpe, pad_token="!")
    torch.manual_seed(SEED + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_2"])).eval()
    _trained_like_layer_norms(text_encoder_2)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer.from_pretrained(str(out / "tokenizer_2")), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def _trained_like_layer_norms(module) -> None:
    """Give the LayerNorms the non-trivial scales and offsets of a trained CLIP.

    Freshly initialised they are exactly (1, 0), so CLIP's output has zero mean per token and A1111's prompt
    weighting, which rescales each chunk back to its original mean, would divide by ~0. A trained CLIP's final
    LayerNorm has learned offsets, and so does this one (drawn from the same fixed seed).
    """
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.LayerNorm):
                layer.weight.copy_(1.0 + 0.1 * torch.randn_like(layer.weight))
                layer.bias.copy_(0.3 + 0.1 * torch.randn_like(layer.bias))


def weights_digest(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every weight file in a diffusers folder, by relative path (for reproducibility checks)."""
    root = Path(model_dir)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def write_default_controlnet(folder: str | Path, weights: Path = SHAPES_CONTROLNET_WEIGHTS) -> Path:
    """Copy the shapes model's canny ControlNet (diffusers' layout, one file) into ``folder``; returns its path.
    Written to a temporary name and renamed, so an export never reads half a file."""
    if not weights.is_file():
        raise UsageError(f"{weights} is missing: train it with scripts/train_default_controlnet.py --out {weights}")
    out = Path(folder) / weights.name
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    shutil.copyfile(weights, partial)
    partial.replace(out)
    return out
