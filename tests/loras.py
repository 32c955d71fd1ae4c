"""LoRA and embedding files for the tests, made offline: LoRAs with peft and saved the way diffusers saves them,
embeddings in A1111's format."""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_lora(model_dir: Path, out: Path, seed: int = 7, targets: tuple[str, ...] = ATTENTION,
              text_encoder: bool = False, rank: int = 4, name: str | None = None, strength: float = 1.0) -> Path:
    """A rank-``rank`` LoRA on the U-Net's ``targets`` (and the text encoder's attention with ``text_encoder``),
    random B times ``strength`` (so it really changes the output), from ``seed``; alpha is half the rank, so its
    scale matters."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=list(targets),
                                     init_lora_weights=False))
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet),
              "unet_lora_adapter_metadata": pipe.unet.peft_config["default"].to_dict()}
    if text_encoder:
        from peft import inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=rank / 2, target_modules=list(TEXT_ATTENTION), init_lora_weights=False)
        inject_adapter_in_model(config, pipe.text_encoder)  # (transformers' add_adapter wants a newer peft)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
        layers["text_encoder_lora_adapter_metadata"] = config.to_dict()
    layers = {key: ({k: v * strength if "lora_B" in k else v for k, v in value.items()}
                    if key.endswith("_layers") else value) for key, value in layers.items()}
    name = name or f"lora{seed}"
    Path(out).mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(out), weight_name=f"{name}.safetensors", **layers)
    return Path(out) / f"{name}.safetensors"


def make_embedding(out: Path, name: str, vectors: int, hidden: int, seed: int = 11) -> Path:
    """An A1111 textual-inversion file (``emb_params`` [vectors, hidden]) of strong random vectors."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / f"{name}.safetensors"
    save_file({"emb_params": torch.randn(vectors, hidden) * 3}, str(path))
    return path


def to_kohya(path: Path, out: Path, alpha: float) -> Path:
    """The same LoRA in kohya/A1111's format: ``lora_unet_<module>`` / ``lora_te_text_model_<module>`` keys with
    ``lora_down``/``lora_up`` weights and an ``alpha`` per layer."""
    from safetensors.torch import load_file, save_file

    converted = {}
    for key, value in load_file(str(path)).items():
        network, _, rest = key.partition(".")
        module, _, kind = rest.rpartition(".lora_")
        name = ("lora_unet_" if network == "unet" else "lora_te_text_model_") + module.replace(".", "_")
        converted[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        converted[f"{name}.alpha"] = torch.tensor(alpha)
    Path(out).mkdir(parents=True, exist_ok=True)
    target = Path(out) / path.name
    save_file(converted, str(target))
    return target
