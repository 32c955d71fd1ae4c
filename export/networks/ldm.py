"""diffusers -> the original (LDM / A1111) single-file layout: what civitai and the hub's ``*.safetensors``
checkpoints look like. diffusers reads that layout but does not write it; sdtrt writes it to build the single
files its tests export (and a user can pack a diffusers folder into one file the same way: ``to_single_file``).

Key layout (Stable Diffusion's ``ldm`` code): ``model.diffusion_model.`` for the U-Net (input/middle/output
blocks), ``first_stage_model.`` for the VAE (encoder/decoder ``down``/``up`` levels, ``mid.block_1``...),
``cond_stage_model.transformer.text_model.`` for SD 1.x's CLIP text model (Hugging Face names) and
``cond_stage_model.model.`` for SD 2.x's OpenCLIP text tower (``transformer.resblocks``, fused q/k/v).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

UNET, VAE, CLIP, OPEN_CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", \
    "cond_stage_model.model."
SDXL_CLIP, SDXL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _move(out: dict, source: dict, old: str, new: str, renames: dict[str, str] | None = None) -> None:
    """Every tensor of ``source`` under ``old.`` goes to ``new.``, with its first name part renamed."""
    for key, value in source.items():
        if key.startswith(old + "."):
            rest = key[len(old) + 1:]
            for before, after in (renames or {}).items():
                if rest.startswith(before + "."):
                    rest = after + rest[len(before):]
                    break
            out[new + "." + rest] = value


def _all_placed(out: dict, state: dict, what: str) -> None:
    if len(out) != len(state):
        raise ValueError(f"{len(state) - len(out)} of the {what}'s {len(state)} weights have no place in the LDM "
                         "layout: not a Stable Diffusion 1.x/2.x architecture")


def _encoder_to_ldm(out: dict, state: dict[str, Any], config: dict[str, Any]) -> int:
    """The encoder half a U-Net and its ControlNets share (embeddings, input blocks, middle block), into ``out``;
    the number of input blocks."""
    _move(out, state, "conv_in", "input_blocks.0.0")
    _move(out, state, "time_embedding.linear_1", "time_embed.0")
    _move(out, state, "time_embedding.linear_2", "time_embed.2")
    _move(out, state, "add_embedding.linear_1", "label_emb.0.0")  # SDXL's added conditions
    _move(out, state, "add_embedding.linear_2", "label_emb.0.2")
    block, levels = 1, len(config["block_out_channels"])
    for i in range(levels):
        for j in range(config["layers_per_block"]):
            _move(out, state, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0", _RESNET)
            _move(out, state, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{block}.1")
            block += 1
        if i < levels - 1:
            _move(out, state, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{block}.0.op")
            block += 1
    _move(out, state, "mid_block.resnets.0", "middle_block.0", _RESNET)
    _move(out, state, "mid_block.attentions.0", "middle_block.1")
    _move(out, state, "mid_block.resnets.1", "middle_block.2", _RESNET)
    return block


def unet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    layers = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    _encoder_to_ldm(out, state, config)
    block = 0
    for i in range(levels):
        for j in range(layers + 1):
            _move(out, state, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0", _RESNET)
            attention = any(k.startswith(f"up_blocks.{i}.attentions.{j}.") for k in state)
            _move(out, state, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{block}.1")
            if j == layers and i < levels - 1:
                _move(out, state, f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{block}.{2 if attention else 1}.conv")
            block += 1
    _move(out, state, "conv_norm_out", "out.0")
    _move(out, state, "conv_out", "out.2")
    _all_placed(out, state, "U-Net")
    return {UNET + key: value for key, value in out.items()}


def vae_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    levels = len(config["block_out_channels"])
    for part in ("encoder", "decoder"):
        _move(out, state, f"{part}.conv_in", f"{part}.conv_in")
        _move(out, state, f"{part}.conv_norm_out", f"{part}.norm_out")
        _move(out, state, f"{part}.conv_out", f"{part}.conv_out")
        _move(out, state, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        _move(out, state, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
        _move(out, state, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
    for i in range(levels):
        for j in range(config["layers_per_block"]):
            _move(out, state, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        _move(out, state, f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        level = levels - 1 - i  # the decoder's up levels are numbered from the bottom
        for j in range(config["layers_per_block"] + 1):
            _move(out, state, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        _move(out, state, f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    for name in ("quant_conv", "post_quant_conv"):
        _move(out, state, name, name)
    _all_placed(out, state, "VAE")
    for key, value in list(out.items()):  # LDM's attention projections are 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return {VAE + key: value for key, value in out.items()}


def clip_to_ldm(state: dict[str, Any], prefix: str = CLIP) -> dict[str, Any]:
    """SD 1.x: Hugging Face CLIP names under ``cond_stage_model.transformer.text_model.`` (SDXL's first encoder:
    under ``conditioner.embedders.0.transformer.text_model.``)."""
    return {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in state.items()
            if not key.startswith("text_projection")}


def open_clip_to_ldm(state: dict[str, Any], layers: int, prefix: str = OPEN_CLIP, extra_layer: bool = True
                     ) -> dict[str, Any]:
    """SD 2.x: OpenCLIP's text tower. Hugging Face's q/k/v projections are fused into in_proj. The tower has one
    layer more than the text model SD 2.x reads (the penultimate layer's output): a real file's last layer is
    never used, and here it is a copy of the one before. SDXL's second encoder (``extra_layer`` False) is the
    whole tower, with its text projection (OpenCLIP multiplies by it: Hugging Face's weight, transposed)."""
    projection = state.get("text_projection.weight")
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"]}
    if projection is not None:
        out["text_projection"] = projection.t()
    for i in range(layers + (1 if extra_layer else 0)):
        hf, oc = f"encoder.layers.{min(i, layers - 1)}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat([state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[oc + f"attn.out_proj.{kind}"] = state[hf + f"self_attn.out_proj.{kind}"]
            out[oc + f"ln_1.{kind}"] = state[hf + f"layer_norm1.{kind}"]
            out[oc + f"ln_2.{kind}"] = state[hf + f"layer_norm2.{kind}"]
            out[oc + f"mlp.c_fc.{kind}"] = state[hf + f"mlp.fc1.{kind}"]
            out[oc + f"mlp.c_proj.{kind}"] = state[hf + f"mlp.fc2.{kind}"]
    return {prefix + key: value for key, value in out.items()}


def controlnet_to_ldm(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers ControlNet's weights in the original layout (``input_blocks``, ``zero_convs``,
    ``input_hint_block``, ``middle_block_out``), as lllyasviel's files have them."""
    placed: dict[str, Any] = {}
    block = _encoder_to_ldm(placed, {k: v for k, v in state.items() if not k.startswith("controlnet_")}, config)
    for i in range(block):
        _move(placed, state, f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0")
    _move(placed, state, "controlnet_mid_block", "middle_block_out.0")
    hint = ["controlnet_cond_embedding.conv_in"]
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    hint += [f"controlnet_cond_embedding.blocks.{i}" for i in blocks] + ["controlnet_cond_embedding.conv_out"]
    for index, name in enumerate(hint):  # (LDM's Sequential has a SiLU between the convolutions)
        _move(placed, state, name, f"input_hint_block.{2 * index}")
    if len(placed) != len(state):
        raise ValueError(f"{len(state) - len(placed)} ControlNet weights have no place in the original layout")
    return placed


def to_single_file(model_dir: str | Path, out: str | Path, dtype: str = "float32", open_clip: bool = False) -> Path:
    """Write a diffusers Stable Diffusion folder as one original-layout ``.safetensors`` (``dtype``: float32 or
    float16); ``open_clip`` writes the text encoder in SD 2.x's OpenCLIP layout."""
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)
    text = pipe.text_encoder.state_dict()
    second = getattr(pipe, "text_encoder_2", None)
    if second is not None:  # SDXL: both encoders under the conditioner's embedders
        texts = {**clip_to_ldm(text, SDXL_CLIP),
                 **open_clip_to_ldm(second.state_dict(), second.config.num_hidden_layers, SDXL_OPEN_CLIP, False)}
    else:
        texts = open_clip_to_ldm(text, pipe.text_encoder.config.num_hidden_layers) if open_clip else clip_to_ldm(text)
    state = {
        **unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)),
        **vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)),
        **texts,
    }
    cast = getattr(torch, dtype)
    state = {key: value.detach().to(cast).clone().contiguous() for key, value in state.items()}  # none shared
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out
