"""A ControlNet as ONNX sees it, and the U-Net's side of it: the residuals one gives and the other takes.

A ControlNet is a copy of its U-Net's encoder that reads a control picture beside the latents; its outputs are one
residual per skip connection of the U-Net (12 for SD 1.x, 9 for SDXL) and one for the middle block, which the
U-Net adds to its own (diffusers' ``down_block_additional_residuals``). Its architecture is its checkpoint's
U-Net's: the config is the U-Net's (``ControlNetModel.from_unet``), the control picture's channels and the hint
encoder's widths read from the weights, and a file whose weights do not fit that config is refused naming both.

Layouts read: A1111's single files in the original layout (``control_v11p_sd15_canny.pth``: ``input_blocks``,
``zero_convs``, ``input_hint_block``, ``middle_block_out``; the ``control_model.`` prefix of the first releases),
diffusers' layout as one file (most SDXL ControlNets on civitai) and diffusers folders.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel
from safetensors.torch import save_file

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import (CONTROL_HINT, CONTROL_SCALES, IMAGE_H, IMAGE_W, LATENT_H, LATENT_W, MID_RESIDUAL,
                                 UNET_BATCH, DimRange, TensorSpec, down_residual, scaled_dim, scaled_range)
from sdtrt.export.networks.descriptors import ADDED_CONDITIONS, Descriptor
from sdtrt.export.networks.single_file import Weights

LDM_PREFIX = "control_model."  # the first ControlNet releases' prefix
CONTROL_LORA = "lora_controlnet"  # Stability's Control-LoRA marks its files with this key
T2I_ADAPTER = "adapter.body.0.resnets.0.block1.weight"


def layout(weights: Weights) -> str:
    """Which layout a ControlNet file is in: "ldm", "diffusers"; anything else is refused naming what it is."""
    name = weights.path.name
    if weights.has("time_embed.0.weight") or weights.has(LDM_PREFIX + "time_embed.0.weight"):
        return "ldm"
    if weights.has("controlnet_cond_embedding.conv_in.weight"):
        return "diffusers"
    if weights.has(CONTROL_LORA):
        raise UsageError(f"--controlnets: {name} is a Control-LoRA (Stability's ControlNet as a LoRA of the U-Net), "
                         "which diffusers does not load; use the full ControlNet it was made from")
    if any(key.startswith(("adapter.", "body.")) for key in weights.shapes):
        raise UsageError(f"--controlnets: {name} is a T2I-Adapter; sdtrt serves ControlNets (a T2I-Adapter adds to "
                         "the U-Net's blocks, not its skip connections: not served yet)")
    raise UsageError(f"--controlnets: {name} is not a ControlNet (no time_embed or controlnet_cond_embedding keys; "
                     f"its first keys are {sorted(weights.shapes)[:3]})")


def _ldm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix(LDM_PREFIX): value for key, value in state.items()}


def _fits(weights: Weights, kind: str, unet_config: dict[str, Any]) -> str | None:
    """What keeps the file's ControlNet from the U-Net's architecture (None: nothing): its width, its text
    context's width, SDXL's added conditions."""
    def shape(ldm: str, diffusers: str) -> tuple[int, ...] | None:
        if kind == "diffusers":
            return weights.shape(diffusers)
        return weights.shape(ldm) or weights.shape(LDM_PREFIX + ldm)

    conv_in = shape("input_blocks.0.0.weight", "conv_in.weight")
    cross = next((s for k, s in weights.shapes.items() if k.endswith("attn2.to_k.weight")), None)
    added = shape("label_emb.0.0.weight", "add_embedding.linear_1.weight")
    differs = []
    if conv_in is None or conv_in[0] != unet_config["block_out_channels"][0]:
        differs.append(f"{conv_in[0] if conv_in else '?'} channels, the U-Net {unet_config['block_out_channels'][0]}")
    if cross is not None and cross[1] != unet_config["cross_attention_dim"]:
        differs.append(f"a {cross[1]}-wide text context, the U-Net {unet_config['cross_attention_dim']}")
    if (added is not None) != (unet_config.get("addition_embed_type") == "text_time"):
        differs.append("SDXL's added conditions" + (" (the U-Net has none)" if added is not None else
                                                   " missing (the U-Net takes them)"))
    return "; ".join(differs) or None


def family_name(added: bool, cross: int | None) -> str:
    """A ControlNet's family, by SDXL's added conditions and its text context's width (for the refusal's words)."""
    if added:
        return "SDXL"
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(cross, f"{cross}-wide text context")


def _weights_family(weights: Weights) -> str:
    added = any(weights.has(k) for k in ("label_emb.0.0.weight", "add_embedding.linear_1.weight",
                                          LDM_PREFIX + "label_emb.0.0.weight"))
    cross = next((s[1] for k, s in weights.shapes.items() if k.endswith("attn2.to_k.weight")), None)
    return family_name(added, cross)


def _hint_widths(state: dict[str, torch.Tensor], kind: str) -> tuple[int, list[int]]:
    """(the control picture's channels, the hint encoder's widths) from the weights: LDM's input_hint_block is
    conv, then (conv, strided conv) per width, then the zero conv; diffusers' the same under its own names."""
    if kind == "diffusers":
        first = state["controlnet_cond_embedding.conv_in.weight"]
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
        widths = [int(first.shape[0])] + [int(state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0])
                                          for i in blocks[1::2]]
        return int(first.shape[1]), widths
    convs = sorted(int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.") and k.endswith(".weight"))
    outs = [int(state[f"input_hint_block.{i}.weight"].shape[0]) for i in convs[:-1]]  # (the last: the zero conv)
    return int(state[f"input_hint_block.{convs[0]}.weight"].shape[1]), outs[0::2]


def _folder_fits(config: dict[str, Any], unet_config: dict[str, Any]) -> str | None:
    keys = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
            "transformer_layers_per_block")
    differs = [f"{k} {config.get(k)!r}, the U-Net {unet_config.get(k)!r}" for k in keys
               if _jsonable(config.get(k)) != _jsonable(unet_config.get(k))]
    return "; ".join(differs) or None


def load_controlnet(path: Path, weights: Weights | None, state: dict[str, torch.Tensor], unet) -> ControlNetModel:
    """The ControlNet of one file (``weights``: its names and shapes, ``state``: its tensors) or diffusers folder,
    in its U-Net's architecture."""
    if path.is_dir():
        model = ControlNetModel.from_pretrained(str(path), local_files_only=True)
        why = _folder_fits(dict(model.config), dict(unet.config))
        if why is not None:
            family = family_name(model.config.get("addition_embed_type") == "text_time",
                                 model.config.get("cross_attention_dim"))
            raise UsageError(f"--controlnets: {path.name} ({family} ControlNet) does not fit the checkpoint's U-Net "
                             f"({why}); use a ControlNet of the checkpoint's family")
        return model.float().eval()
    kind = layout(weights)
    why = _fits(weights, kind, dict(unet.config))
    if why is not None:
        raise UsageError(f"--controlnets: {path.name} ({_weights_family(weights)} ControlNet) does not fit the "
                         f"checkpoint's U-Net ({why}); use a ControlNet of the checkpoint's family")
    if kind == "ldm":
        state = _ldm_state(state)
    channels, widths = _hint_widths(state, kind)
    config = {**ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                          conditioning_embedding_out_channels=tuple(widths),
                                          conditioning_channels=channels).config,
              "in_channels": int(state["input_blocks.0.0.weight" if kind == "ldm" else "conv_in.weight"].shape[1])}
    with tempfile.TemporaryDirectory(prefix="sdtrt-controlnet-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(_jsonable(dict(config))))
        if kind == "ldm":  # diffusers' own conversion of the original layout (from_single_file reads a file)
            single = Path(tmp) / "controlnet.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(single))
            model = ControlNetModel.from_single_file(str(single), config=tmp, local_files_only=True,
                                                     torch_dtype=torch.float32)
        else:
            model = ControlNetModel.from_config(ControlNetModel.load_config(tmp))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise UsageError(f"--controlnets: {path.name} does not fit the checkpoint's U-Net: "
                                 f"{len(missing)} weights missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                                 f"(e.g. {unexpected[:2]})")
    return model.float().eval()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- the residuals --------------------------------------------------------------------------------------------

def residual_levels(unet_config: dict[str, Any]) -> list[tuple[int, int]]:
    """(channels, how many times smaller than the latents) of each residual: the U-Net's skip connections in its
    encoder's order (conv_in, each level's blocks, each downsampler), then its middle block."""
    channels, per_level = list(unet_config["block_out_channels"]), unet_config["layers_per_block"]
    per_level = per_level if isinstance(per_level, (list, tuple)) else [per_level] * len(channels)
    out, factor = [(channels[0], 1)], 1
    for i, width in enumerate(channels):
        out += [(width, factor)] * per_level[i]
        if i < len(channels) - 1:
            factor *= 2
            out.append((width, factor))
    return out + [(channels[-1], factor)]


def residual_specs(unet_config: dict[str, Any]) -> tuple[TensorSpec, ...]:
    """The residual tensors by name, as the ControlNets give them and the U-Net takes them."""
    levels = residual_levels(unet_config)
    names = [down_residual(i) for i in range(len(levels) - 1)] + [MID_RESIDUAL]

    def dim(base: str, factor: int) -> str:
        return base if factor == 1 else scaled_dim(base, factor)

    return tuple(TensorSpec(name, "float32", (UNET_BATCH, width, dim(LATENT_H, f), dim(LATENT_W, f)))
                 for name, (width, f) in zip(names, levels))


def residual_dims(unet_config: dict[str, Any], dims: dict[str, DimRange]) -> dict[str, DimRange]:
    """The ranges of the residuals' scaled latent dims, from the latents'."""
    factors = {f for _, f in residual_levels(unet_config) if f > 1}
    return {scaled_dim(base, f): scaled_range(dims[base], f) for base in (LATENT_H, LATENT_W) for f in factors}


def zero_residuals(unet_config: dict[str, Any], rows: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """Sample residuals for latents of ``height`` x ``width`` (the descriptors' inputs)."""
    return tuple(torch.randn(rows, c, -(-height // f), -(-width // f)) * 0.1 for c, f in residual_levels(unet_config))


class ControlNet(torch.nn.Module):
    """The ControlNet: the U-Net's inputs (latents, timestep, text context, SDXL's added conditions), the control
    picture and a scale per row and residual -> the residuals, each scaled. The scales carry the unit's weight and
    control mode (sd-webui-controlnet's soft injection is a scale per residual, its CFG injection a zero for the
    uncond rows), so the loop only sums the units' residuals."""

    def __init__(self, controlnet: torch.nn.Module, added: int):
        super().__init__()
        self.controlnet, self.added = controlnet, added

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        added, (hint, scales) = rest[:self.added], rest[self.added:]
        extra = {"added_cond_kwargs": dict(zip(ADDED_CONDITIONS, added))} if added else {}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=hint, return_dict=False, **extra)
        return tuple(r * scales[:, i, None, None, None] for i, r in enumerate((*down, mid)))


def controlnet_descriptor(controlnet: ControlNetModel, unet: Descriptor, name: str,
                          unet_config: dict[str, Any]) -> Descriptor:
    """A ControlNet network named ``name``, taking the U-Net descriptor's own inputs (up to its residuals)."""
    residuals = residual_specs(unet_config)
    own = tuple(t for t in unet.inputs if t.name not in {r.name for r in residuals})
    channels = int(controlnet.config.in_channels)
    sample = own[0]
    inputs = (TensorSpec(sample.name, sample.dtype, (sample.shape[0], channels, *sample.shape[2:])), *own[1:],
              TensorSpec(CONTROL_HINT, "float32", (UNET_BATCH, int(controlnet.config.conditioning_channels),
                                                   IMAGE_H, IMAGE_W)),
              TensorSpec(CONTROL_SCALES, "float32", (UNET_BATCH, len(residuals))))
    factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)

    def make_inputs(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
        plain = unet.make_inputs(d)[:len(own)]
        n = plain[0].shape[0]
        hint = torch.rand(n, int(controlnet.config.conditioning_channels), d[LATENT_H] * factor, d[LATENT_W] * factor)
        return (plain[0][:, :channels], *plain[1:], hint, torch.rand(n, len(residuals)))

    return Descriptor(name=name, module=ControlNet(controlnet, len(own) - 3), inputs=inputs, outputs=residuals,
                      make_inputs=make_inputs, trace_dims=unet.trace_dims)
