"""The networks' Hypertile variants (``sdtrt export --hypertile``): A1111's Hypertile layers attend within tiles
whose counts the request draws (sdtrt.requests.hypertile) and sends as one more input, HYPERTILE_INPUT: each row
repeats the call's tiles, a few numbers a layer (_tiled), and the graph cuts the layer's tokens by them, runs the
attention on each tile, and puts them back. One tile (all ones) is the layer as it is, so one graph serves every
draw.

The layers are A1111's (extensions-builtin/hypertile: its DEPTH_LAYERS and DEPTH_LAYERS_XL tables, by depth),
named there as in the original (ldm) U-Net; here they are found under diffusers' names, in the order they run."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import HYPERTILE_INPUT, HYPERTILE_NUMBERS, HYPERTILE_SUFFIX, TensorSpec
from sdtrt.export.networks.descriptors import Descriptor

# A1111's layers as (ldm block, transformer blocks) by depth: SD 1.x / 2.x, and SDXL
_SD_DEPTHS = {0: ["input_blocks.1", "input_blocks.2", "output_blocks.9", "output_blocks.10", "output_blocks.11"],
              1: ["input_blocks.4", "input_blocks.5", "output_blocks.6", "output_blocks.7", "output_blocks.8"],
              2: ["input_blocks.7", "input_blocks.8", "output_blocks.3", "output_blocks.4", "output_blocks.5"],
              3: ["middle_block"]}
_XL_LEVEL1 = ["input_blocks.4", "input_blocks.5", "output_blocks.3", "output_blocks.4", "output_blocks.5"]
_XL_LEVEL2 = ["input_blocks.7", "input_blocks.8", "output_blocks.0", "output_blocks.1", "output_blocks.2"]
SD_LAYERS = {depth: [(block, 0) for block in blocks] for depth, blocks in _SD_DEPTHS.items()}
XL_LAYERS = {0: [(block, 0) for block in _XL_LEVEL1],
             1: [(block, 1) for block in _XL_LEVEL1] + [(block, k) for block in _XL_LEVEL2 for k in range(10)],
             2: [("middle_block", k) for k in range(10)], 3: []}
VAE_LAYER = "decoder.mid_block.attentions.0"  # (A1111 lists it under depth 0)


def diffusers_layer(block: str, transformer: int) -> str:
    """An ldm block's first attention's self-attention, by diffusers' name: input_blocks.i -> down block
    (i - 1) // 3's attention (i - 1) % 3, output_blocks.i -> up block i // 3's attention i % 3."""
    if block == "middle_block":
        where = "mid_block.attentions.0"
    else:
        kind, index = block.split(".")
        i = int(index)
        where = f"down_blocks.{(i - 1) // 3}.attentions.{(i - 1) % 3}" if kind == "input_blocks" else \
            f"up_blocks.{i // 3}.attentions.{i % 3}"
    return f"{where}.transformer_blocks.{transformer}.attn1"


def _running_order(name: str) -> tuple[int, ...]:
    phase = 0 if name.startswith("down_blocks") else 1 if name.startswith("mid_block") else 2
    return (phase, *(int(n) for n in re.findall(r"\d+", name)))


def unet_layers(unet: torch.nn.Module) -> list[tuple[str, int, int]]:
    """The U-Net's Hypertile layers in the order they run: (diffusers name, A1111's depth, resolution level: how
    many times the latents were halved there)."""
    table = XL_LAYERS if unet.config.get("addition_embed_type") == "text_time" else SD_LAYERS
    present = dict(unet.named_modules())
    downs, ups = len(unet.config.down_block_types), len(unet.config.up_block_types)
    found = []
    for depth, layers in table.items():
        for block, transformer in layers:
            name = diffusers_layer(block, transformer)
            if name not in present:
                continue
            if name.startswith("mid"):
                level = downs - 1
            else:
                index = int(name.split(".")[1])
                level = index if name.startswith("down") else ups - 1 - index
            found.append((name, depth, level))
    return sorted(found, key=lambda layer: _running_order(layer[0]))


def _tiled(forward, splits: torch.Tensor, index: int, spatial: bool):
    """``forward`` of one attention layer run on the tiles of ``splits``' ``index``-th layer (row 0: the call's).
    Its numbers: the VAE's (tiles down, tiles across); the U-Net's (tiles down, tiles across, A1111's first side
    of its tokens), the rest found from the tokens, so that all ones (a warm-up's, a probe's) is one whole tile."""
    def run(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if spatial:  # the VAE's: [b, c, h, w]
            nh, nw = (splits[0, HYPERTILE_NUMBERS["vae_decoder"] * index + k] for k in range(2))
            b, c, h, w = hidden.shape
            hh, ww = h // nh, w // nw
            tiles = hidden.reshape(b, c, nh, hh, nw, ww).permute(0, 2, 4, 1, 3, 5).reshape(b * nh * nw, c, hh, ww)
            out = forward(tiles, *args, **kwargs)
            return out.reshape(b, nh, nw, c, hh, ww).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        nh, nw, side = (splits[0, HYPERTILE_NUMBERS["unet"] * index + k] for k in range(3))
        b, n, c = hidden.shape  # the U-Net's: [b, tokens, c], read as (nh, side / nh, nw, (n / side) / nw)
        hh, ww = side // nh, n // side // nw
        tiles = hidden.reshape(b, nh, hh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, hh * ww, c)
        out = forward(tiles, *args, **kwargs)
        return out.reshape(b, nh, nw, hh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)
    return run


class Hypertiled(torch.nn.Module):
    """A network whose Hypertile layers attend within the tiles its last input gives (set per call, as the same
    modules also make the plain variant)."""

    def __init__(self, inner: torch.nn.Module, layers: list[str], spatial: bool):
        super().__init__()
        self.inner, self.layers, self.spatial = inner, layers, spatial

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *own, splits = inputs
        modules = [self.inner.get_submodule(name) for name in self.layers]
        for index, module in enumerate(modules):
            module.forward = _tiled(type(module).forward.__get__(module), splits, index, self.spatial)
        try:
            return self.inner(*own)
        finally:
            for module in modules:
                del module.forward


def with_hypertile(desc: Descriptor, layers: list[str], spatial: bool) -> Descriptor:
    """The Hypertile variant of a network: its inputs and HYPERTILE_INPUT ([rows, numbers a layer x layers],
    int64: 2 a layer for the VAE, 3 for the U-Net; its sample inputs all ones, every layer one tile)."""
    rows, per_layer = desc.inputs[0].shape[0], HYPERTILE_NUMBERS[desc.name]

    def make_inputs(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
        own = desc.make_inputs(d)
        return (*own, torch.ones(own[0].shape[0], per_layer * len(layers), dtype=torch.int64))

    return replace(desc, name=desc.name + HYPERTILE_SUFFIX, module=Hypertiled(desc.module, layers, spatial),
                   inputs=(*desc.inputs, TensorSpec(HYPERTILE_INPUT, "int64", (rows, per_layer * len(layers)))),
                   make_inputs=make_inputs)


def hypertile_descriptors(pipe, plain: list[Descriptor]) -> tuple[list[Descriptor], list[list]]:
    """The U-Net's and VAE decoder's Hypertile variants of the ``plain`` networks, and the U-Net's layers for the
    spec ([name, depth, level] in running order: what a request draws tiles for)."""
    by_name = {desc.name: desc for desc in plain}
    layers = unet_layers(pipe.unet)
    if not layers or VAE_LAYER not in dict(pipe.vae.named_modules()):
        raise UsageError("--hypertile: this checkpoint's U-Net or VAE has none of A1111's Hypertile layers (its "
                         "attention blocks by their SD 1.x/2.x/XL names); export it without --hypertile")

    unet = with_hypertile(by_name["unet"], [f"unet.{name}" for name, _, _ in layers], spatial=False)
    vae = with_hypertile(by_name["vae_decoder"], [f"vae.{VAE_LAYER}"], spatial=True)
    return [unet, vae], [list(layer) for layer in layers]
