"""A1111's ControlNet models (sd-webui-controlnet's models folder): each file or diffusers folder of ``--controlnets
DIR`` exported as a network of the model it belongs to (``export/networks/controlnet.py``), named after its file
stem, which requests select by A1111's model name ("stem [hash]").

A ControlNet must fit its checkpoint's U-Net (an SD 1.x ControlNet for an SD 1.x checkpoint, SDXL's for SDXL):
one that does not is refused naming both before anything is exported. With ControlNets, every U-Net variant
takes their residuals as inputs (``descriptors(..., residuals=...)``).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from safetensors.torch import load_file

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import controlnet_component
from sdtrt.export.networks.checkpoint import file_sha256, folder_sha256, torch_load
from sdtrt.export.networks.controlnet import controlnet_descriptor, load_controlnet
from sdtrt.export.networks.descriptors import Descriptor
from sdtrt.export.networks.single_file import Weights

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin")  # the extension's models folder (pickled: --allow-pickle)
MAX_CONTROLNETS = 32  # one export's (each is a network of about a U-Net's encoder to serve)


def controlnet_slug(name: str) -> str:
    """A ControlNet's part of its network's name: its stem, lower case, runs of other characters as one "-"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "controlnet"


def short_hash(path: Path) -> str:
    """A1111's old model hash, which the extension shows in brackets after a ControlNet's name: sha256 of the 64 KiB
    at 1 MiB into the file, 8 hex digits (a folder: its weights file's)."""
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))), None)
        if path is None:
            return "00000000"
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def controlnet_sources(folder: Path) -> list[Path]:
    """The folder's ControlNets: its files and its diffusers folders (a config.json of a ControlNetModel), by name."""
    if not folder.is_dir():
        raise UsageError(f"--controlnets {folder}: no such folder")
    found = sorted(p for p in folder.iterdir() if (p.is_file() and p.suffix in CONTROLNET_SUFFIXES)
                   or (p.is_dir() and (p / "config.json").is_file()))
    if not found:
        raise UsageError(f"--controlnets {folder}: no ControlNet files ({', '.join(CONTROLNET_SUFFIXES)}) or "
                         "diffusers ControlNet folders in it")
    if len(found) > MAX_CONTROLNETS:
        raise UsageError(f"--controlnets {folder}: {len(found)} ControlNets; at most {MAX_CONTROLNETS} per model")
    slugs: dict[str, str] = {}
    for path in found:
        other = slugs.setdefault(controlnet_slug(_stem(path)), path.name)
        if other != path.name:
            raise UsageError(f"--controlnets {folder}: {other} and {path.name} would share the network name "
                             f"{controlnet_slug(_stem(path))!r}; rename one")
    return found


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _state(path: Path, allow_pickle: bool) -> tuple[Weights, dict]:
    """(the file's tensor names and shapes, its tensors) of one ControlNet file (pickled ones read weights-only
    unless ``allow_pickle``)."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise UsageError(f"--controlnets {path}: not a readable .safetensors file ({exc})") from None
    else:
        data, _ = torch_load(path, allow_pickle, "--controlnets")
        while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        state = {k: v for k, v in data.items() if hasattr(v, "shape")} if isinstance(data, dict) else {}
    return Weights(path, {k: tuple(v.shape) for k, v in state.items()}), state


def register_controlnets(pipe, unet: Descriptor, folder: Path, allow_pickle: bool, report=print
                         ) -> tuple[list[Descriptor], dict[str, dict]]:
    """The folder's ControlNets as (their networks, the spec's ``controlnets``: A1111's name -> title, file,
    sha256, slug, network), each loaded in the checkpoint's U-Net architecture and checked to fit it. ``unet``: the
    U-Net's descriptor (with its residual inputs), whose inputs each ControlNet takes."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    networks, registry = [], {}
    for path in controlnet_sources(folder):
        weights, state = (None, {}) if path.is_dir() else _state(path, allow_pickle)
        controlnet = load_controlnet(path, weights, state, pipe.unet)
        hint = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
        if hint != factor:
            raise UsageError(f"--controlnets: {path.name} reads its control picture {hint}x smaller than the "
                             f"latents' pixels; the checkpoint's VAE is {factor}x: not a ControlNet of this model")
        name, slug = _stem(path), controlnet_slug(_stem(path))
        component = controlnet_component(slug)
        networks.append(controlnet_descriptor(controlnet, unet, component, dict(pipe.unet.config)))
        digest = folder_sha256(path, progress=False) if path.is_dir() else file_sha256(path, progress=False)
        title = f"{name} [{short_hash(path)}]"
        registry[name] = {"name": name, "title": title, "file": path.name, "sha256": digest, "slug": slug,
                          "network": component}
        report(f"ControlNet {title}: network {component}, for requests' units that name it")
    return networks, registry
