"""Upscaler models (A1111's models/ESRGAN, models/RealESRGAN, models/DAT and models/SwinIR: ESRGAN, Real-ESRGAN and
its compact SRVGG, HAT, DAT, SwinIR), each exported as a network of the model it is registered with.

The architecture, scale and widths are read from the weights by spandrel (what ComfyUI and Forge load them with):
every file of the folder is registered under its stem, A1111's naming, or refused naming it. spandrel is installed
without its dependencies (pyproject.toml's [tool.sdtrt] no-deps): its registry imports two torchvision functions
for architectures sdtrt does not register (LaMa's rotate, RestoreFormer's normalize), and PyPI's torchvision is a
CUDA build whose operators fail to load with a CPU torch; ``spandrel()`` imports it with a stand-in for that
module, which the super-resolution architectures never call.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import threading
import types
from pathlib import Path
from typing import Any

import torch

from sdtrt.contract.errors import UsageError
from sdtrt.contract.hires import MAX_TILE
from sdtrt.contract.spec import (BATCH, SINGLE, UPSCALE_H, UPSCALE_W, UPSCALED_H, UPSCALED_W, DimRange, TensorSpec,
                                upscaler_component)
from sdtrt.export.networks.checkpoint import file_sha256, folder_files, read_weights
from sdtrt.export.networks.descriptors import Descriptor, OnePerCall
from sdtrt.pipeline.ksampling import standing_in, torchvision_stand_in

SPANDREL = "spandrel==0.4.2"  # as scripts/setup.sh installs it (--no-deps; einops is one of sdtrt's own)
UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt")  # .pth / .pt read weights-only unless --allow-pickle
MAX_UPSCALERS = 32
# The tile sizes the networks take: from spandrel's smallest requirement to MAX_TILE, A1111's 192 the optimum
TILE_DIMS = {UPSCALE_H: DimRange(16, 192, MAX_TILE), UPSCALE_W: DimRange(16, 192, MAX_TILE),
             SINGLE: DimRange(1, 1, 1)}
_LOCK = threading.Lock()
# spandrel's architectures as A1111 1.10 tiles them, by spandrel id -> the name users know: "grid", through
# upscale_with_model by its ESRGAN_tile options (ESRGAN and Real-ESRGAN's RRDB, Real-ESRGAN's compact SRVGG, HAT);
# "dat", the same by its DAT_tile options; "swin", through its SwinIR script's tiled_upscale_2 by SWIN_tile
TILED = {"grid": {"ESRGAN": "ESRGAN / Real-ESRGAN", "Compact": "Real-ESRGAN compact (SRVGG)", "HAT": "HAT"},
         "dat": {"DAT": "DAT"}, "swin": {"SwinIR": "SwinIR"}}
TILING = {arch: kind for kind, archs in TILED.items() for arch in archs}
# one tile a call: SwinIR's traced graph reads the batch as a number; DAT's gives batched tiles other values
# (2e-4 apart, measured), and A1111 runs its tiles one by one
SINGLE_TILE = ("SwinIR", "DAT")


def _missing(*_: Any, **__: Any) -> Any:
    raise UsageError("this architecture needs torchvision, which sdtrt does not install (a CUDA build on PyPI)")


def spandrel() -> types.ModuleType:
    """spandrel, imported once with the torchvision stand-in (removed again, so nothing else sees it)."""
    with _LOCK:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        if importlib.util.find_spec("spandrel") is None:
            raise UsageError(f"spandrel is not installed: scripts/setup.sh installs it (pip install --no-deps "
                             f"{SPANDREL} einops)")
        stand_ins = torchvision_stand_in(  # what spandrel's LaMa and RestoreFormer import, failing if called
            normalize=_missing, rotate=_missing,
            InterpolationMode=types.SimpleNamespace(BILINEAR="bilinear", NEAREST="nearest"))
        with standing_in(stand_ins):
            return importlib.import_module("spandrel")


def upscaler_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "upscaler"


def read_upscaler(path: Path, allow_pickle: bool = False) -> Any:
    """spandrel's descriptor of the model in ``path`` (architecture, scale, the torch module), or UsageError naming
    the file: not readable, not an architecture spandrel knows, or not an upscaler."""
    state = read_weights(path, allow_pickle, "--upscalers")
    if not isinstance(state, dict):
        raise UsageError(f"--upscalers {path}: no state dict in it")
    try:
        model = spandrel().ModelLoader().load_from_state_dict(state)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--upscalers {path}: not an upscaler architecture spandrel knows ({str(exc)[:200]})") from None
    if model.architecture.id not in TILING:
        names = [name for archs in TILED.values() for name in archs.values()]
        raise UsageError(f"--upscalers {path}: a {model.architecture.name} model; sdtrt registers "
                         f"{', '.join(names)} (the architectures A1111 tiles by its ESRGAN_tile, DAT_tile and SWIN_tile "
                         "options)")
    if model.purpose not in ("SR", "Restoration") or (model.input_channels, model.output_channels) != (3, 3):
        raise UsageError(f"--upscalers {path}: a {model.architecture.name} {model.purpose} model "
                         f"({model.input_channels} -> {model.output_channels} channels, x{model.scale}); sdtrt "
                         "registers RGB upscaling models here")
    return model


class _Upscaler(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def input_multiple(model: Any) -> int:
    """The multiple of pixels a tile's sides must be for the network: spandrel's own requirement (pixel-unshuffle
    models), and SwinIR's window, which its torch module pads to on its own but its traced graph cannot."""
    multiple = int(model.size_requirements.multiple_of)
    if TILING[model.architecture.id] == "swin":
        multiple = math.lcm(multiple, int(model.model.window_size))
    return multiple


def upscaler_descriptor(model: Any, slug: str) -> Descriptor:
    """The network: tiles [N, 3, h, w] (BGR in [0, 1], as A1111 feeds its upscalers) -> [N, 3, h * s, w * s];
    a SwinIR or DAT takes one tile a call (N spans 1..1), a SwinIR's sides a multiple of its window."""
    single, multiple = model.architecture.id in SINGLE_TILE, input_multiple(model)
    rows = SINGLE if single else BATCH

    def make_inputs(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
        h, w = (-(-d[dim] // multiple) * multiple for dim in (UPSCALE_H, UPSCALE_W))
        return (torch.rand(1 if single else d[BATCH], 3, h, w),)

    kind = OnePerCall if single else Descriptor
    return kind(name=upscaler_component(slug), module=_Upscaler(model.model).eval(),
                inputs=(TensorSpec("image", "float32", (rows, 3, UPSCALE_H, UPSCALE_W)),),
                outputs=(TensorSpec("upscaled", "float32", (rows, 3, UPSCALED_H, UPSCALED_W)),),
                make_inputs=make_inputs, trace_dims={BATCH: 1, UPSCALE_H: 48, UPSCALE_W: 32})


def register_upscalers(folder: Path, allow_pickle: bool, report=print) -> tuple[list[Descriptor], dict[str, dict]]:
    """The folder's upscaler models as (the networks to export, the spec's ``upscalers``: stem -> file name,
    sha256, architecture, scale, the size multiple its inputs need, how A1111 tiles it (TILED), slug), every file
    checked first."""
    files = folder_files(folder, UPSCALER_SUFFIXES, "--upscalers", "upscaler", MAX_UPSCALERS)
    networks, registry, slugs = [], {}, {}
    for path in files:
        model = read_upscaler(path, allow_pickle)
        slug = upscaler_slug(path.stem)
        if slugs.setdefault(slug, path.name) != path.name or path.stem in registry:
            raise UsageError(f"--upscalers {folder}: {slugs[slug]} and {path.name} would share the name "
                             f"{path.stem!r} / {slug!r}; rename one")
        networks.append(upscaler_descriptor(model, slug))
        registry[path.stem] = {"file": path.name, "sha256": file_sha256(path, progress=False), "slug": slug,
                               "architecture": model.architecture.name, "scale": int(model.scale),
                               "multiple_of": input_multiple(model), "tiling": TILING[model.architecture.id]}
        report(f"upscaler {path.stem}: {model.architecture.name} x{model.scale}")
    return networks, registry
