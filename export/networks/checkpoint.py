"""Loading a checkpoint: a diffusers folder or a single-file ``.safetensors`` (or ``.ckpt``), always offline.

A ``.ckpt`` / ``.pt`` / ``.bin`` is a pickle, and unpickling can run any code the file names. :func:`torch_load`
reads one with ``weights_only=True`` first: tensors, numbers, strings and containers only, so nothing in the file
can run (a plain state dict, which most checkpoints are, loads so without ``--allow-pickle``). A file that holds
anything else (a training framework's callback, an optimizer's class) is refused naming what it holds, unless
``--allow-pickle`` says the file is trusted; then it is unpickled fully, with a warning naming those classes.
diffusers itself only ever reads such files with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sdtrt.contract.errors import UsageError
from sdtrt.export.networks.single_file import load_single_file

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _weights_only_refusal(path: Path, exc: Exception) -> tuple[list[str], str]:
    """(the globals a weights-only load refused, torch's reason), from the error and the file: torch names the
    first unsupported global; the zip format can be scanned for all of them without unpickling anything."""
    text = str(exc)
    names = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", text)
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) or names
    except Exception:  # the legacy (non-zip) format cannot be scanned: the error's name is what there is
        pass
    reason = text.split("error:", 1)[-1].split("Check the documentation", 1)[0]
    return names, " ".join(reason.split())[:200]


def torch_load(path: Path, allow_pickle: bool, what: str) -> tuple[Any, list[str] | None]:
    """(what ``path`` holds, None) when it loads with ``weights_only=True``; else, with ``allow_pickle``, (its full
    unpickling, the classes that needed it), warning that it can run code and naming them; else UsageError naming
    them and ``--allow-pickle``. ``what`` names the file's role in messages ("checkpoint", "LoRA", ...)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise UsageError(f"{what} {path}: not a readable file ({' '.join(str(exc).split())[:200]})") from None
        names, reason = _weights_only_refusal(path, exc)
    except Exception as exc:  # a truncated zip, a file that is no torch file at all, ...
        raise UsageError(f"{what} {path}: not a readable file ({' '.join(str(exc).split())[:200]})") from None
    held = f"objects of {', '.join(names)}" if names else f"what a weights-only load refuses ({reason})"
    if not allow_pickle:
        raise UsageError(f"{what} {path} needs pickle to load: it holds {held}, and unpickling runs whatever code "
                         "the file names. Convert it to .safetensors, or pass --allow-pickle for a file you trust")
    warnings.warn(f"loading {path.name} with pickle, for {held}: it can run code; prefer .safetensors", stacklevel=2)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False), names
    except Exception as exc:
        raise UsageError(f"{what} {path}: not a readable file ({' '.join(str(exc).split())[:200]})") from None


@dataclass
class Checkpoint:
    pipe: Any  # diffusers.StableDiffusionPipeline, float32 on the CPU, eval mode
    name: str  # what A1111 shows as "Model"
    source: str
    sha256: str  # A1111's "Model hash" is the first 10 hex digits
    loras: tuple[dict, ...] = ()  # fused LoRAs: name, scale, sha256
    vae: dict | None = None  # a VAE file loaded in place of the checkpoint's: name, sha256


PROGRESS_FROM = 1 << 28  # files larger than this show a progress bar while hashed (256 MiB)


def file_sha256(path: Path, chunk: int = 1 << 24, progress: bool = True) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                      disable=not progress or size < PROGRESS_FROM) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def folder_sha256(root: Path, progress: bool = True) -> str:
    """sha256 over every file's relative path and sha256, in sorted order: changes when any weight or config does."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path, progress=progress)}\n".encode())
    return h.hexdigest()


def checkpoint_sha256(model: str | Path, progress: bool = True) -> str:
    """What A1111's "Model hash" is the start of: a file's sha256 (a folder's: see folder_sha256)."""
    path = Path(model)
    if not path.exists():
        raise UsageError(f"MODEL_DIR {str(path)!r} does not exist: give a diffusers folder or a .safetensors file")
    return folder_sha256(path, progress) if path.is_dir() else file_sha256(path, progress=progress)


def parse_lora(text: str) -> tuple[Path, float]:
    """``path[:scale]`` (the scale as in A1111's <lora:name:scale>; default 1) -> (path, scale)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def lora_tensors(path: Path, allow_pickle: bool, what: str) -> dict[str, Any]:
    """A pickled LoRA file's tensors (what diffusers' load_lora_weights takes in place of a path), read by
    :func:`torch_load`; anything else in the file (a trainer's metadata) is left out."""
    data = torch_load(path, allow_pickle, what)[0]
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path}: expected a dict of tensors, found {type(data).__name__}")
    return {key: value for key, value in data.items() if hasattr(value, "shape")}


def fuse_loras(ckpt: Checkpoint, loras: list[tuple[Path, float]], allow_pickle: bool = False) -> Checkpoint:
    """Fuse LoRA files (A1111/kohya or diffusers format, as diffusers' load_lora_weights reads them) into the
    weights, each at its scale; the export then bakes them in. The spec records them. A pickled LoRA (.pt, .bin,
    .ckpt) is read by :func:`torch_load` first: refused, before anything is fused, when it needs pickle and
    ``allow_pickle`` is not given."""
    h = hashlib.sha256(ckpt.sha256.encode())
    fused = []
    for path, _ in loras:
        if not path.is_file():
            raise UsageError(f"--lora {path}: no such file")
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            torch_load(path, False, "--lora")
    for index, (path, scale) in enumerate(loras):
        adapter = f"lora{index}"
        weights = lora_tensors(path, allow_pickle, "--lora") if path.suffix in PICKLE_SUFFIXES else str(path)
        try:
            ckpt.pipe.load_lora_weights(weights, adapter_name=adapter)
            ckpt.pipe.fuse_lora(lora_scale=scale, adapter_names=[adapter])
            # The fused weights stay in the base layers; the PEFT wrappers must go, or the exported graph (and
            # its ONNX weight names, which a TensorRT refit matches by name) would differ from the plain one.
            ckpt.pipe.unload_lora_weights()
        except Exception as exc:
            raise UsageError(f"--lora {path} could not be applied to this checkpoint: {exc}") from exc
        digest = file_sha256(path)
        h.update(f"{digest}:{scale}".encode())
        fused.append({"name": path.stem, "scale": scale, "sha256": digest, "file": str(path.resolve())})
    # The weights differ from the checkpoint's, so the model hash does too; the infotext lists the LoRAs.
    return replace(ckpt, sha256=h.hexdigest() if fused else ckpt.sha256, loras=tuple(fused))


def read_weights(path: Path, allow_pickle: bool, what: str) -> Any:
    """A weights file's contents: a .safetensors file's tensors, else what torch_load reads (weights only unless
    ``allow_pickle``); UsageError naming ``what`` and the file when it cannot be read."""
    if path.suffix != ".safetensors":
        return torch_load(path, allow_pickle, what)[0]
    try:
        return load_file(str(path))
    except Exception as exc:
        raise UsageError(f"{what} {path}: not a readable .safetensors file ({exc})") from None


def folder_files(folder: Path, suffixes: tuple[str, ...], what: str, kind: str, most: int) -> list[Path]:
    """The files of a registered folder (``what``: its flag) with those suffixes, in name order: refused when the
    folder is missing, holds none of ``kind``, or more than ``most``."""
    if not folder.is_dir():
        raise UsageError(f"{what} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
    if not files:
        raise UsageError(f"{what} {folder}: no {kind} files in it ({', '.join(suffixes)})")
    if len(files) > most:
        raise UsageError(f"{what} {folder}: {len(files)} {kind} files; at most {most} per model")
    return files


VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # A1111's models/VAE files (pickled ones need --allow-pickle)
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def load_vae(path: Path, config: dict, allow_pickle: bool = False, what: str = "--vae") -> AutoencoderKL:
    """A VAE file with the architecture ``config`` describes (the checkpoint's VAE's): the original (LDM) layout,
    as vae-ft-mse-840000-ema-pruned is (a .pt / .ckpt read weights-only unless ``allow_pickle``), or diffusers'."""
    if path.suffix not in VAE_SUFFIXES or not path.is_file():
        raise UsageError(f"{what} {path}: give an existing VAE file ({', '.join(VAE_SUFFIXES)})")
    weights = read_weights(path, allow_pickle, what)
    if path.suffix != ".safetensors":
        loaded = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
        if not isinstance(loaded, dict):
            raise UsageError(f"{what} {path}: not a VAE (no state dict in it)")
        weights = {k.removeprefix("first_stage_model."): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        weights = {k: v for k, v in weights.items() if k.startswith(_VAE_PARTS)}
    try:
        if any(".down_blocks." in key for key in weights):  # diffusers' own layout
            vae = AutoencoderKL.from_config(config)
            vae.load_state_dict(weights, strict=True)
        elif any(key.startswith(("encoder.down.", "first_stage_model.encoder.down.")) for key in weights):
            with tempfile.TemporaryDirectory(prefix="sdtrt-vae-") as tmp:
                (Path(tmp) / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                                   if not k.startswith("_")}))
                single = Path(tmp) / "vae.safetensors"  # (from_single_file reads a file: the weights as read)
                save_file({k: v.contiguous() for k, v in weights.items()}, str(single))
                vae = AutoencoderKL.from_single_file(str(single), config=tmp, local_files_only=True,
                                                     torch_dtype=torch.float32)
        else:
            raise UsageError(f"{what} {path}: not a VAE (no encoder.down.* or encoder.down_blocks.* weights)")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{what} {path} does not fit this checkpoint's VAE ({str(exc)[:300]})") from None
    return vae.to(torch.float32).eval()


def override_vae(ckpt: Checkpoint, path: Path, report=print, allow_pickle: bool = False) -> Checkpoint:
    """Load a VAE file in place of the checkpoint's (A1111's "SD VAE" chosen for good): ``load_vae``."""
    ckpt.pipe.vae = load_vae(path, dict(ckpt.pipe.vae.config), allow_pickle)
    report(f"VAE: {path.name} in place of the checkpoint's")
    return replace(ckpt, vae={"name": path.name, "sha256": file_sha256(path), "file": str(path.resolve())})


def load_checkpoint(model: str | Path, config: str | Path | None = None, *, allow_pickle: bool = False,
                    prediction_type: str | None = None, report=print, sha256: str | None = None) -> Checkpoint:
    """Load a StableDiffusionPipeline without touching the network.

    ``model`` is a diffusers folder (with model_index.json) or a single ``.safetensors`` file (``.ckpt`` with
    ``allow_pickle``), whose architecture is read from its weights (``sdtrt.export.networks.single_file``); ``config``, a
    local diffusers folder of the same architecture, overrides that. ``prediction_type`` overrides the family's
    (or, for SD 2.x, the weights' own answer to A1111's v-prediction test). ``sha256``: the checkpoint's, when the
    caller hashed it already.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(model)
    if not path.exists():
        raise UsageError(f"MODEL_DIR {str(path)!r} does not exist: give a diffusers folder or a .safetensors file")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(
                f"MODEL_DIR {str(path)!r} is not a diffusers folder (no model_index.json). Give a diffusers "
                "pipeline folder, a single-file .safetensors checkpoint, or build the default one with "
                "`sdtrt init-default --out models/default`"
            )

        kind = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        if kind == "StableDiffusionXLImg2ImgPipeline":
            raise UsageError(f"MODEL_DIR {str(path)!r} is an SDXL refiner: sdtrt does not serve A1111's Refiner "
                             "checkpoint (an architecture of its own: one OpenCLIP, aesthetic scores); export the SDXL "
                             "base model (a request's refiner_checkpoint may name another base model of the server)")
        pipe = _load(lambda sd, **kw: sd.from_pretrained(str(path), **kw), f"MODEL_DIR {str(path)!r}",
                     xl=kind.startswith("StableDiffusionXL"))
        if prediction_type:
            pipe.scheduler.register_to_config(prediction_type=prediction_type)
        sha, name = sha256 or folder_sha256(path), path.name
    elif path.suffix in SINGLE_FILE_SUFFIXES:
        sha = sha256 or file_sha256(path)  # first: a file that cannot be read is named before anything else
        pipe = load_single_file(path, config, allow_pickle=allow_pickle, prediction_type=prediction_type,
                                report=report, load=_load)
        name = path.stem  # A1111's "Model:" is the file's stem
    else:
        raise UsageError(
            f"MODEL_DIR {str(path)!r} is neither a diffusers folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} file"
        )
    if int(pipe.unet.config.in_channels) == 2 * int(pipe.vae.config.latent_channels):
        # latents + the init image's latents: an instruct-pix2pix (edit) model, the only kind A1111 gives an
        # "Image CFG scale"; sdtrt's jobs are text-to-image, img2img and inpainting
        raise UsageError(f"{str(path)!r} is an instruct-pix2pix (edit) model ({pipe.unet.config.in_channels}-channel "
                         "U-Net): sdtrt serves text-to-image and inpainting models; export one of those")
    for module in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.unet, pipe.vae):
        if module is not None:
            module.eval()
    return Checkpoint(pipe=pipe, name=name, source=str(path.resolve()), sha256=sha)


def _load(open_pipeline, what: str, xl: bool = False):
    """``open_pipeline(StableDiffusionPipeline, **offline_float32_kwargs)`` (``StableDiffusionXLPipeline`` with
    ``xl``), with diffusers' errors named."""
    diffusers_logging.disable_progress_bar()  # the export shows its own progress
    extra = {} if xl else {"safety_checker": None}
    try:
        return open_pipeline(StableDiffusionXLPipeline if xl else StableDiffusionPipeline, local_files_only=True,
                             dtype=torch.float32, **extra)
    except UsageError:
        raise
    except Exception as exc:  # diffusers raises many kinds; the user needs to know which file failed, and why
        raise UsageError(f"{what} could not be loaded as a Stable Diffusion pipeline: {exc}") from exc
