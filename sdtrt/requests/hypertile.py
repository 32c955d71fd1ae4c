"""A1111's Hypertile (its built-in extension, after github.com/tfernd/HyperTile): chosen self-attention layers of
the U-Net (and the VAE decoder's middle attention) attend within tiles of the picture instead of across all of it.
The tiles are drawn at random for every call of a network, from one Python ``random.Random`` seeded with the job's
first seed, so the same request gives A1111's picture only if the same draws come in the same order. This module
makes them as A1111 does; the networks' ``_hypertile`` variants (``sdtrt export --hypertile``) take them as an
input (HYPERTILE_INPUT: per U-Net layer, tiles down, tiles across and A1111's first side of its tokens; for the
VAE's layer, tiles down and across).

A1111's rules, restated:
  * Each network is configured for a picture size: its tile side is the largest power of two dividing both sides
    (at most its max tile option), in latent cells max(128, that) // 8; the U-Net's layers also keep the picture's
    aspect ratio. A layer takes part if the network is on and its depth is at most the max depth option.
  * A U-Net layer's tokens (h * w of its resolution) are split into (h, w) again from the aspect ratio (for a
    picture that is not square, A1111 finds the width's count first: its tiles follow that reading); each side's
    tile count is drawn from its divisors' co-divisors, the smallest ``swap size`` of those whose tile is at least
    the tile side times 2 ** depth. The VAE's layer draws from the latent height and width the same way.
  * Draws happen in the order the layers run: every U-Net call (each model evaluation; cond and uncond separately
    where their texts' lengths differ, cond first), then every decoded image.
  * The job seeds once with its first image's seed, configured for the first pass; the hires fix's second pass is
    configured again for its size (with the second-pass switch), reseeded first unless the U-Net option is on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from typing import TYPE_CHECKING

import numpy as np

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.spec import HYPERTILE, HYPERTILE_INPUT, ModelSpec

if TYPE_CHECKING:  # (torch only where networks run: a client checks requests without it)
    import torch

Split = tuple[int, int]  # the VAE's: (tiles down, tiles across)


@dataclass(frozen=True)
class HypertileOptions:
    """One network's A1111 options: hypertile_enable_*, hypertile_max_depth_*, _max_tile_*, _swap_size_*."""

    enabled: bool = False
    max_depth: int = 3
    max_tile: int = 256
    swap_size: int = 3


def largest_tile(width: int, height: int) -> int:
    """The largest power of two that divides both sides."""
    gcd, tile = math.gcd(width, height), 1
    while gcd % (tile * 2) == 0:
        tile *= 2
    return tile


def _closest_divisors(hw: int, aspect: float) -> tuple[int, int]:
    pairs = [(i, hw // i) for i in range(2, hw + 1) if hw % i == 0]
    ratios = [w / h for h, w in pairs]
    return pairs[ratios.index(min(ratios, key=lambda r: abs(r - aspect)))]


@lru_cache(maxsize=4096)
def token_sides(hw: int, aspect: float) -> tuple[int, int]:
    """A1111's reading of a layer's ``hw`` tokens as two sides of ratio ``aspect`` (width / height): rounded
    square roots, one of them mended to divide ``hw``, else the divisor pair of the nearest ratio."""
    h, w = round(math.sqrt(hw * aspect)), round(math.sqrt(hw / aspect))
    if h * w != hw:
        if (hw / h).is_integer():
            w = hw // h
        elif (hw / w).is_integer():
            h = hw // w
        else:
            return _closest_divisors(hw, aspect)
    return h, w


def random_divisor(rng: random.Random, value: int, min_value: int, max_options: int) -> int:
    """How many tiles a side of ``value`` is cut into: one of the first ``max_options`` of value // d for its
    divisors d from min(min_value, value) up, by one draw of ``rng`` (a draw even when there is one choice)."""
    low = min(min_value, value)
    counts = [value // d for d in range(low, value + 1) if value % d == 0][:max_options]
    return counts[rng.randint(0, len(counts) - 1)]


@dataclass
class _Network:
    """A network as configured for one picture size."""

    options: HypertileOptions
    tile: int = 16  # the tile side in latent cells
    aspect: float = 1.0
    on: bool = False

    def configure(self, width: int, height: int, enabled: bool) -> None:
        self.tile = max(128, min(largest_tile(width, height), self.options.max_tile)) // 8
        self.aspect, self.on = width / height, enabled

    def takes(self, depth: int) -> bool:
        return self.on and depth <= self.options.max_depth


def level_side(side: int, level: int) -> int:
    """A latent side after ``level`` of the U-Net's stride-2 downsamplings (each rounds up)."""
    for _ in range(level):
        side = (side + 1) // 2
    return side


class HypertileDraws:
    """One job's Hypertile draws, as A1111's script and hooks make them (see the module's rules). ``layers``: the
    U-Net's hooked layers in the order they run, each (A1111's depth, its resolution level), from the export."""

    def __init__(self, seed: int, layers: list[tuple[int, int]], unet: HypertileOptions, vae: HypertileOptions,
                 unet_second_pass: bool, size: tuple[int, int]):
        self.seed, self.layers = seed, layers
        self.unet, self.vae, self.second_pass = _Network(unet), _Network(vae), unet_second_pass
        self.rng = random.Random(seed)
        self._configure(size, unet.enabled)

    def _configure(self, size: tuple[int, int], unet_on: bool) -> None:
        self.unet.configure(*size, unet_on)
        self.vae.configure(*size, self.vae.options.enabled)

    def before_hires(self, size: tuple[int, int]) -> None:
        """The hires fix's second pass, at its ``size`` (width, height)."""
        if not self.unet.options.enabled:
            self.rng.seed(self.seed)
        self._configure(size, self.second_pass)

    @property
    def unet_on(self) -> bool:
        return any(self.unet.takes(depth) for depth, _ in self.layers)

    @property
    def vae_on(self) -> bool:
        return self.vae.takes(0)

    def unet_splits(self, latent_h: int, latent_w: int) -> list[int]:
        """One U-Net call's tiles, layer after layer (tiles down, across, A1111's first side; a layer that takes
        no part: one tile)."""
        out: list[int] = []
        for depth, level in self.layers:
            if not self.unet.takes(depth):
                out += (1, 1, 1)
                continue
            hw = level_side(latent_h, level) * level_side(latent_w, level)
            h, w = token_sides(hw, self.unet.aspect)
            if h * w != hw:
                raise ValueError(f"Hypertile cannot read {hw} tokens at ratio {self.unet.aspect:g} as two sides")
            least = self.unet.tile * 2 ** depth
            nh = random_divisor(self.rng, h, least, self.unet.options.swap_size)
            nw = random_divisor(self.rng, w, least, self.unet.options.swap_size)
            out += (nh, nw, h)
        return out

    def vae_split(self, latent_h: int, latent_w: int) -> Split:
        """One decoded image's tiles of the VAE decoder's middle attention."""
        return (random_divisor(self.rng, latent_h, self.vae.tile, self.vae.options.swap_size),
                random_divisor(self.rng, latent_w, self.vae.tile, self.vae.options.swap_size))


def _rows(numbers: list[int] | Split, rows: int, device: "torch.device") -> "torch.Tensor":
    # torch only where networks run: a client checks requests without it
    import torch

    return torch.tensor(list(numbers), dtype=torch.int64, device=device).repeat(rows, 1)


class HypertileNetworks:
    """A request's networks with Hypertile's draws: each U-Net call runs the U-Net's hypertile variant with the
    call's tiles (HYPERTILE_INPUT in its conditioning, which the networks read), each image is decoded on its own
    by the VAE decoder's variant with its tiles; everything else is the request's networks as they are."""

    def __init__(self, nets, draws: HypertileDraws):
        self.nets, self.draws = nets, draws

    def __getattr__(self, name: str):
        return getattr(self.nets, name)

    def unet(self, sample: "torch.Tensor", timestep: "torch.Tensor", context: dict) -> "torch.Tensor":
        if not self.draws.unet_on:
            return self.nets.unet(sample, timestep, context)
        splits = _rows(self.draws.unet_splits(*sample.shape[-2:]), sample.shape[0], sample.device)
        return self.nets.unet(sample, timestep, {**context, HYPERTILE_INPUT: splits})

    def vae_decode(self, latents: "torch.Tensor") -> np.ndarray:
        if not self.draws.vae_on:
            return self.nets.vae_decode(latents)
        return np.concatenate([self.nets.vae_decode(latents[i:i + 1], _rows(
            self.draws.vae_split(*latents.shape[-2:]), 1, latents.device)) for i in range(latents.shape[0])])


def hypertile_options(request) -> tuple[HypertileOptions, HypertileOptions]:
    """The request's U-Net and VAE options (A1111's hypertile_* options, as its fields)."""
    return (HypertileOptions(request.hypertile_enable_unet, request.hypertile_max_depth_unet, request.hypertile_max_tile_unet,
                             request.hypertile_swap_size_unet),
            HypertileOptions(request.hypertile_enable_vae, request.hypertile_max_depth_vae, request.hypertile_max_tile_vae,
                             request.hypertile_swap_size_vae))


def asks_for_hypertile(request) -> bool:
    return bool(request.hypertile_enable_unet or request.hypertile_enable_vae or (request.hypertile_enable_unet_secondpass
                                                                     and getattr(request, "enable_hr", False)))


def check_hypertile(request, spec: ModelSpec) -> None:
    """A request asking for Hypertile (``asks_for_hypertile``) of a model that has its variants, without what they
    were not exported with (tiling, a registered VAE for the decoder, LoRAs: checked with the plan)."""
    name = next(n for n in ("hypertile_enable_unet", "hypertile_enable_vae", "hypertile_enable_unet_secondpass") if getattr(request, n))
    if not spec.hypertiles:
        raise InvalidRequest(name, True, f"false for model {spec.key!r}: it was exported without its Hypertile "
                             "networks; export it again with `sdtrt export ... --hypertile`")
    if request.tiling:
        raise InvalidRequest(name, True, "false with tiling: the export has no networks that do both")
    if request.vae and request.hypertile_enable_vae:
        raise InvalidRequest("hypertile_enable_vae", True, f"false with vae {request.vae!r}: the Hypertile decoder is the "
                             "model's own VAE's")


def check_hypertile_loras(request, loras) -> None:
    if loras and asks_for_hypertile(request):
        raise InvalidRequest("hypertile_enable_unet", True, "false with LoRAs in the prompt: the Hypertile U-Net has no "
                             "LoRA inputs")


def hypertiled(plan, nets):
    """``nets`` with the plan's Hypertile draws, or as they are when the request asks for none."""
    request = plan.request
    if not asks_for_hypertile(request):
        return nets
    layers = [(depth, level) for _, depth, level in plan.spec.extra[HYPERTILE]]
    unet, vae = hypertile_options(request)
    draws = HypertileDraws(plan.seeds[0], layers, unet, vae, bool(request.hypertile_enable_unet_secondpass),
                           (plan.first.width, plan.first.height))
    return HypertileNetworks(nets, draws)
