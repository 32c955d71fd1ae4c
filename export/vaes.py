"""A1111's "SD VAE" per request: the VAE files of a folder (A1111's models/VAE), each exported as its own encoder
and decoder networks beside the model's, which a request that names the file runs.

A VAE is small next to the U-Net (SD's: 84 M parameters), so each is a pair of networks of its own rather than
weights swapped into one engine: the same dims and profiles as the model's VAE, served as Triton models named
``<model>__vae_decoder_vae_<slug>`` (``sdtrt.contract.spec.vae_component``). Every file must have the checkpoint's
VAE architecture (an SD 1.x VAE for an SD 1.x checkpoint); one that does not is refused naming it, before anything
is exported.
"""

from __future__ import annotations

import re
import types
from dataclasses import replace
from pathlib import Path

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import vae_component
from sdtrt.export.checkpoint import VAE_SUFFIXES, file_sha256, folder_files, load_vae, torch_load
from sdtrt.export.descriptors import Descriptor, vae_decoder_descriptor, vae_encoder_descriptor
from sdtrt.export.lora import PICKLE_SUFFIXES

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
