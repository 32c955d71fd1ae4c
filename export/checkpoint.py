"""Loading a checkpoint: a diffusers folder or a single-file ``.safetensors``, always offline."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtrt.errors import UsageError

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class Checkpoint:
    pipe: Any  # diffusers.StableDiffusionPipeline, float32 on the CPU, eval mode
    name: str  # what A1111 shows as "Model"
    source: str
    sha256: str  # A1111's "Model hash" is the first 10 hex digits
    loras: tuple[dict, ...] = ()  # fused LoRAs: name, scale, sha256


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_sha256(root: Path) -> str:
    """sha256 over every file's relative path and sha256, in sorted order: changes when any weight or config does."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def parse_lora(text: str) -> tuple[Path, float]:
    """``path[:scale]`` (the scale as in A1111's <lora:name:scale>; default 1) -> (path, scale)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def fuse_loras(ckpt: Checkpoint, loras: list[tuple[Path, float]]) -> Checkpoint:
    """Fuse LoRA files (A1111/kohya or diffusers format, as diffusers' load_lora_weights reads them) into the
    weights, each at its scale; the export then bakes them in. The spec records them."""
    h = hashlib.sha256(ckpt.sha256.encode())
    fused = []
    for index, (path, scale) in enumerate(loras):
        if not path.is_file():
            raise UsageError(f"--lora {path}: no such file")
        adapter = f"lora{index}"
        try:
            ckpt.pipe.load_lora_weights(str(path), adapter_name=adapter)
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
    return Checkpoint(ckpt.pipe, ckpt.name, ckpt.source, h.hexdigest() if fused else ckpt.sha256, tuple(fused))


def load_checkpoint(model: str | Path, config: str | Path | None = None) -> Checkpoint:
    """Load a StableDiffusionPipeline without touching the network.

    ``model`` is a diffusers folder (with model_index.json) or a single ``.safetensors``/``.ckpt`` file; the
    latter needs ``config``, a local diffusers folder of the same architecture, because diffusers otherwise
    fetches the configs and tokenizer from the Hugging Face hub.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(model)
    if not path.exists():
        raise UsageError(f"MODEL_DIR {str(path)!r} does not exist: give a diffusers folder or a .safetensors file")
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # the export shows its own progress
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(
                f"MODEL_DIR {str(path)!r} is not a diffusers folder (no model_index.json). Give a diffusers "
                "pipeline folder, a single-file .safetensors checkpoint, or build the default one with "
                "`sdtrt init-default --out models/default`"
            )
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(path), local_files_only=True, safety_checker=None, dtype=torch.float32
            )
        except Exception as exc:  # diffusers raises many kinds; the user needs to know which folder failed
            raise UsageError(f"MODEL_DIR {str(path)!r} could not be loaded as a Stable Diffusion pipeline: {exc}") from exc
        sha = folder_sha256(path)
        name = path.name
    elif path.suffix in SINGLE_FILE_SUFFIXES:
        if config is None:
            raise UsageError(
                f"{path.name} is a single-file checkpoint: pass --config DIR, a local diffusers folder of the same "
                "architecture (its configs and tokenizer are used; nothing is downloaded)"
            )
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(config), local_files_only=True, safety_checker=None, dtype=torch.float32
            )
        except Exception as exc:
            raise UsageError(f"{str(path)!r} could not be loaded with config {str(config)!r}: {exc}") from exc
        sha = file_sha256(path)
        name = path.stem
    else:
        raise UsageError(
            f"MODEL_DIR {str(path)!r} is neither a diffusers folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} file"
        )
    for module in (pipe.text_encoder, pipe.unet, pipe.vae):
        module.eval()
    return Checkpoint(pipe=pipe, name=name, source=str(path.resolve()), sha256=sha)
