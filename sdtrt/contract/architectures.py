"""The Stable Diffusion families sdtrt serves, as facts the project writes down (never fetched): what a
checkpoint's weights cannot say about itself. A single file's sizes are read from its weights
(``sdtrt.export.networks.single_file``); these fill in the rest.

* SD 1.x: OpenAI's CLIP ViT-L text encoder (head size 64, quick-GELU), 8 attention heads in every U-Net
  transformer, 512 px native, epsilon prediction, PNDM scaled-linear betas as shipped with v1-5.
* SD 2.x: OpenCLIP ViT-H (head size 64, GELU, read at the penultimate layer), U-Net heads of size 64, linear
  projections; 512 px epsilon (2.x base) or 768 px v-prediction (2.x 768-v, A1111's v2-inference-v).
* SDXL: CLIP ViT-L and OpenCLIP bigG (with its projection, whose pooled output conditions the U-Net), both read
  at the penultimate layer; U-Net heads of size 64, linear projections, the size/crop time ids embedded 256 wide;
  1024 px native, epsilon, EulerDiscrete with "leading" spacing as SDXL base ships; a VAE scaled by 0.13025.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HEAD_SIZE = 64  # CLIP's and SD 2.x's U-Net's attention head size

# Scaled-linear betas, as the v1-5 and 2.x checkpoints ship them; samplers override the class, not these.
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                 prediction_type="epsilon", timestep_spacing="leading")


@dataclass(frozen=True)
class Family:
    name: str
    prediction_type: str
    sample_size: int  # latent cells of the native size
    text: dict[str, Any]  # text encoder settings beside its sizes
    pad_token: str  # the tokenizer's padding token
    unet_fixed_heads: int | None  # every transformer's head count, or None: channels / HEAD_SIZE
    v_prediction_unet: dict[str, Any] = field(default_factory=dict)  # what a v-prediction (768) model changes
    scheduler_class: str = "PNDMScheduler"
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SCHEDULER))
    vae_scaling_factor: float = 0.18215
    text_2: dict[str, Any] | None = None  # the second text encoder's settings (SDXL)

    def text_config(self, **sizes: int) -> dict[str, Any]:
        hidden = sizes["hidden_size"]
        return {**self.text, **sizes, "num_attention_heads": max(1, hidden // HEAD_SIZE), "projection_dim": hidden}

    def unet_heads(self, block_out_channels: list[int]) -> int | list[int]:
        if self.unet_fixed_heads is not None:
            return self.unet_fixed_heads
        return [max(1, c // HEAD_SIZE) for c in block_out_channels]

    def unet_for(self, prediction_type: str) -> dict[str, Any]:
        return dict(self.v_prediction_unet) if prediction_type == "v_prediction" else {}


_CLIP_IDS = dict(bos_token_id=49406, eos_token_id=49407, layer_norm_eps=1e-5)

SD1 = Family("SD 1.x", "epsilon", 64, {**_CLIP_IDS, "hidden_act": "quick_gelu", "pad_token_id": 49407},
             pad_token="<|endoftext|>", unet_fixed_heads=8)
SD2 = Family("SD 2.x", "epsilon", 64, {**_CLIP_IDS, "hidden_act": "gelu", "pad_token_id": 0},
             pad_token="!", unet_fixed_heads=None,
             v_prediction_unet={"sample_size": 96, "upcast_attention": True})
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)
SDXL = Family("SDXL", "epsilon", 128, {**_CLIP_IDS, "hidden_act": "quick_gelu", "pad_token_id": 49407},
              pad_token="<|endoftext|>", unet_fixed_heads=None, scheduler_class="EulerDiscreteScheduler",
              scheduler=dict(SDXL_SCHEDULER), vae_scaling_factor=0.13025,
              text_2={**_CLIP_IDS, "hidden_act": "gelu", "pad_token_id": 0})
FAMILIES = (SD1, SD2, SDXL)
