"""A1111's upscaler models at work: a picture cut into tiles, each through the model, put back together, then
resized to the size asked for, as A1111 1.10 runs its ESRGAN-family upscalers (modules/upscaler_utils.py
upscale_with_model, modules/upscaler.py Upscaler.upscale, images.resize_image) and SwinIR (its built-in
extension's upscale over upscaler_utils.tiled_upscale_2).

The network itself is a callable here (``Run``: a batch of tiles in, the tiles at the model's scale out): the job
runs it on Triton, the in-process runner on its own session, tests on a torch module.

A1111's rules, kept so that the same request gives the same picture:
  * The ESRGAN family ("grid") and DAT ("dat"): tiles of ``tile`` pixels overlapping by ``overlap`` (its options
    ESRGAN_tile and ESRGAN_tile_overlap, DAT_tile and DAT_tile_overlap), cut and blended as its SD upscale's grid (sdtrt.requests.grids); 0: the whole picture at
    once. sdtrt caps a tile at MAX_TILE pixels a side (a whole picture larger than that is tiled at MAX_TILE), so
    that memory stays bounded.
  * SwinIR ("swin"): the picture mirrored past its bottom and right edges to the next multiple of 8 beyond them,
    square tiles of min(SWIN_tile, its sides) pixels stepping by the tile less SWIN_tile_overlap, the last one
    flush with the end, their outputs averaged where they overlap, then cut back to the picture's size.
  * Each tile goes in as BGR in [0, 1] (A1111's pil_image_to_torch_bgr) and comes back clamped, rounded to 8 bits
    (SwinIR: the averaged picture, once).
  * The model runs up to three times until the picture covers the target (a 2x model for a 4x upscale), then a
    Lanczos resize to the target rounded down to a multiple of 8, then (the hires fix) to the exact size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from sdtrt.contract.hires import MAX_TILE, Tiling
from sdtrt.contract.spec import ModelSpec, upscaler_component
from sdtrt.requests.grids import Tiles, combine_tiles, split_tiles

Run = Callable[[np.ndarray], np.ndarray]  # [N, 3, h, w] float32 BGR in [0, 1] -> [N, 3, h * s, w * s]
Call = Callable[[str, Sequence[np.ndarray]], dict[str, np.ndarray]]  # a network by name: its outputs by name
SWIN_PAD = 8  # A1111 pads a SwinIR's picture to a multiple of 8 (its window_size argument, never passed)


@dataclass(frozen=True)
class ModelUpscaler:
    """One registered upscaler model as a request runs it: its network, scale, the multiple its inputs need."""

    run: Run
    scale: int
    multiple_of: int = 1
    batch: int = 1  # tiles per network call
    tiling: str = "grid"  # how A1111 tiles it: "grid" (ESRGAN_tile), "dat" (DAT_tile, the same way), "swin"


def model_upscaler(spec: ModelSpec, name: str, call: Call) -> ModelUpscaler:
    """The upscaler ``name`` registered with ``spec``, its network run by ``call`` (on Triton, or in process)."""
    entry = spec.upscalers[name]
    component = spec.component(upscaler_component(entry["slug"]))
    output = component.outputs[0].name

    def run(tiles: np.ndarray) -> np.ndarray:
        return call(component.name, [tiles])[output]

    return ModelUpscaler(run, entry["scale"], entry.get("multiple_of", 1), spec.dims[component.inputs[0].shape[0]].max,
                         entry.get("tiling", "grid"))


def _to_bgr(tiles: list[Image.Image]) -> np.ndarray:
    arrays = [np.asarray(t.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1) for t in tiles]
    return (np.stack(arrays).astype(np.float64) / 255).astype(np.float32)


def _from_bgr(array: np.ndarray) -> list[Image.Image]:
    pixels = (255.0 * np.clip(array.astype(np.float32), 0, 1)).round().astype(np.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.transpose(1, 2, 0)[:, :, ::-1])) for p in pixels]


def _run_padded(model: ModelUpscaler, batch: np.ndarray) -> np.ndarray:
    """The network on tiles whose sides are not a multiple of what it needs: reflect-padded to one and the
    result cut back, as spandrel's pixel-unshuffle models pad."""
    m, (h, w) = model.multiple_of, batch.shape[-2:]
    pad_h, pad_w = -h % m, -w % m
    if pad_h or pad_w:
        batch = np.pad(batch, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
    return model.run(batch)[..., :h * model.scale, :w * model.scale]


def _run_tiles(model: ModelUpscaler, tiles: list[Image.Image]) -> list[Image.Image]:
    out: list[Image.Image] = []
    for start in range(0, len(tiles), model.batch):
        out += _from_bgr(_run_padded(model, _to_bgr(tiles[start:start + model.batch])))
    return out


def _grid_once(image: Image.Image, model: ModelUpscaler, tile: int, overlap: int) -> Image.Image:
    tile = min(tile, MAX_TILE) if tile > 0 else (MAX_TILE if max(image.size) > MAX_TILE else 0)
    if tile <= 0:
        return _run_tiles(model, [image])[0]
    tiles = split_tiles(image, tile, tile, overlap)
    out = _run_tiles(model, tiles.pictures)
    s = out[0].width // tile
    scaled = Tiles(tile * s, tile * s, image.width * s, image.height * s, overlap * s,
                   [(y * s, [(x * s, None) for x, _ in row]) for y, row in tiles.rows])
    return combine_tiles(scaled, out)


def _mirrored(array: np.ndarray, axis: int) -> np.ndarray:
    """A1111's SwinIR padding along ``axis``: the picture, then itself flipped, cut at the next multiple of
    SWIN_PAD past its end (one row at least)."""
    length = array.shape[axis]
    wanted = min((length // SWIN_PAD + 1) * SWIN_PAD, 2 * length)
    return np.concatenate([array, np.flip(array, axis)], axis).take(range(wanted), axis=axis)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiled_upscale_2 starts its tiles along a side (an overlap as large as a tile cut down to a picture
    smaller than SWIN_tile steps by the tile: A1111 leaves its pixels unweighted there)."""
    stride = tile - overlap if tile > overlap else tile
    return list(range(0, length - tile, stride)) + [length - tile]


def _swin_once(image: Image.Image, model: ModelUpscaler, tile: int, overlap: int) -> Image.Image:
    bgr, s = _to_bgr([image]), model.scale
    padded = _mirrored(_mirrored(bgr, 2), 3)
    h, w = padded.shape[-2:]
    if tile <= 0 and max(h, w) <= MAX_TILE:  # the whole picture, as one tile
        return _from_bgr(_run_padded(model, padded)[..., :image.height * s, :image.width * s])[0]
    tile = min(tile if tile > 0 else MAX_TILE, MAX_TILE, h, w)
    total = np.zeros((3, h * s, w * s), np.float32)
    weight = np.zeros((1, h * s, w * s), np.float32)
    for y in _starts(h, tile, overlap):
        for x in _starts(w, tile, overlap):
            out = (slice(None), slice(y * s, (y + tile) * s), slice(x * s, (x + tile) * s))
            total[out] += _run_padded(model, padded[..., y:y + tile, x:x + tile])[0]
            weight[out] += 1
    return _from_bgr((total / weight)[None, :, :image.height * s, :image.width * s])[0]


def upscale_once(image: Image.Image, model: ModelUpscaler, tiling: Tiling = Tiling()) -> Image.Image:
    """One pass of the model (A1111's upscale_with_model, or its SwinIR's upscale): the picture at its scale."""
    once = _swin_once if model.tiling == "swin" else _grid_once
    return once(image, model, *tiling.of(model.tiling))


def upscale_by(image: Image.Image, model: ModelUpscaler, scale: float, tiling: Tiling = Tiling()) -> Image.Image:
    """A1111's Upscaler.upscale: the model until the picture covers ``scale`` times its size (three passes at
    most), then Lanczos to that size rounded down to a multiple of 8."""
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = image.size
        image = upscale_once(image, model, tiling)
        if image.size == shape:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
    return image


def upscale_to(image: Image.Image, model: ModelUpscaler, width: int, height: int,
               tiling: Tiling = Tiling()) -> Image.Image:
    """A1111's resize_image(0, ...) with an upscaler model (the hires fix's first pass to its upscaled size):
    upscale_by the larger ratio where it grows, then Lanczos to exactly ``width`` x ``height``."""
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale_by(image, model, scale, tiling)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image
