"""LoRA files for the tests, made offline with peft and saved the way diffusers saves LoRAs."""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def make_lora(model_dir: Path, out: Path, seed: int = 7, targets: tuple[str, ...] = ATTENTION) -> Path:
    """A rank-4 LoRA on the U-Net's ``targets``, random B (so it really changes the output), from ``seed``."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False))
    name = f"lora{seed}.safetensors"
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              weight_name=name)
    return Path(out) / name
