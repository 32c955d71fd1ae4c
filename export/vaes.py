"""A1111's "SD VAE" per request: the VAE files of a folder (A1111's models/VAE), each exported as its own encoder
and decoder networks beside the model's, which a request that names the file runs.

A VAE is small next to the U-Net (SD's: 84 M parameters), so each is a pair of networks of its own rather than
weights swapped into one engine: the same dims and profiles as the model's VAE, served as Triton models named
``<model>__vae_decoder_vae_<slug>`` (``sdtrt.contract.spec.vae_component``). Every file must have the checkpoint's
VAE architecture (an SD 1.x VAE for an SD 1.x checkpoint); one that does not is refused naming it, before anything
is exported.

The live-preview map (:mod:`sdtrt.contract.previews`) is fitted from the model's own VAE here too: pictures with
known colours (flat fields, gradients, shapes; deterministic from a seed) go through the VAE's encoder; a
least-squares fit maps each latent cell (as the U-Net sees it, times the scaling factor) to the mean colour of the
pixels it covers. For SD 1.x's VAE this lands near A1111's hand-picked "Approx cheap" numbers; for
SDXL's, or a fine-tuned VAE, it is that VAE's own.
"""

from __future__ import annotations

import re
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import vae_component
from sdtrt.export.networks.checkpoint import VAE_SUFFIXES, file_sha256, folder_files, load_vae, torch_load
from sdtrt.export.networks.descriptors import Descriptor, vae_decoder_descriptor, vae_encoder_descriptor
from sdtrt.export.networks.lora import PICKLE_SUFFIXES

MAX_VAES = 32  # VAE files one export registers (each adds two networks to serve)


def vae_slug(file_name: str) -> str:
    """A VAE's part of its networks' names: the file's stem, lower case, runs of other characters as one "-"."""
    return re.sub(r"[^a-z0-9]+", "-", Path(file_name).stem.lower()).strip("-") or "vae"


def _vae_files(folder: Path, allow_pickle: bool) -> list[Path]:
    files = folder_files(folder, VAE_SUFFIXES, "--vaes", "VAE", MAX_VAES)
    slugs: dict[str, str] = {}
    for path in files:
        other = slugs.setdefault(vae_slug(path.name), path.name)
        if other != path.name:
            raise UsageError(f"--vaes {folder}: {other} and {path.name} would share the networks' name "
                             f"{vae_slug(path.name)!r}; rename one")
    if not allow_pickle:  # a pickled file that needs more than a weights-only load, refused before any export
        for path in files:
            if path.suffix in PICKLE_SUFFIXES:
                torch_load(path, False, "--vaes")
    return files


def register_vaes(pipe, folder: Path, allow_pickle: bool, report=print) -> tuple[list[Descriptor], dict[str, dict]]:
    """The folder's VAEs as (the networks to export: each one's encoder and decoder, the spec's ``vaes``: file
    name -> name, sha256, slug), checked against the checkpoint's VAE architecture."""
    config = dict(pipe.vae.config)
    networks, registry = [], {}
    for path in _vae_files(folder, allow_pickle):
        vae = load_vae(path, config, allow_pickle, what="--vaes")
        slug = vae_slug(path.name)
        holder = types.SimpleNamespace(vae=vae)  # what the descriptors read of a pipeline
        for desc in (vae_decoder_descriptor(holder), vae_encoder_descriptor(holder)):  # (VAE_NETWORKS)
            networks.append(replace(desc, name=vae_component(desc.name, slug)))
        registry[path.name] = {"name": path.name, "sha256": file_sha256(path, progress=False), "slug": slug}
        report(f"VAE {path.name}: its encoder and decoder, for requests that name it")
    return networks, registry


# --- the live-preview fit ---------------------------------------------------------------------------------------

PICTURES = 12
CELLS = 12  # latent cells per side of each picture


def scenes(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` RGB pictures in [0, 1], (count, 3, size, size): a gradient between two colours with a few
    rectangles and discs of other colours on it."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        a, b = rng.random(3), rng.random(3)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xs + np.sin(angle) * ys + 1.5) / 3.0
        picture = a[:, None, None] * (1 - t) + b[:, None, None] * t
        for _ in range(rng.integers(1, 5)):
            colour = rng.random(3)[:, None, None]
            cx, cy, r = rng.random(), rng.random(), rng.uniform(0.08, 0.35)
            if rng.random() < 0.5:
                inside = (xs - cx) ** 2 + (ys - cy) ** 2 < r * r
            else:
                inside = (abs(xs - cx) < r) & (abs(ys - cy) < r * rng.uniform(0.3, 1.0))
            picture = np.where(inside, colour, picture)
        out[i] = picture
    return out


@torch.no_grad()
def fit_latent_preview(vae, scaling_factor: float, vae_scale_factor: int, seed: int = 0) -> list[list[float]]:
    """The (latent channels + 1) x 3 map (last row: bias) from latents to colours in [0, 1]."""
    size = CELLS * vae_scale_factor
    pictures = torch.from_numpy(scenes(PICTURES, size, seed))
    latents = torch.cat([vae.encode((batch * 2 - 1).to(vae.dtype)).latent_dist.mean.float()
                         for batch in pictures.split(4)]) * scaling_factor
    colours = torch.nn.functional.avg_pool2d(pictures, vae_scale_factor)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double().numpy()
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    matrix, *_ = np.linalg.lstsq(x, y, rcond=None)
    return [[round(float(v), 6) for v in row] for row in matrix]
