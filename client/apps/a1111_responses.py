"""sdtrt's results and state in A1111's response shapes: pure functions of what the server answered (a
generation, its catalog, a progress report, its metrics), so each shape is checked without a server.

Images travel as base64 PNG with the infotext inside, ``parameters`` echo the request, ``info`` is A1111's JSON
string; the gateway's own addition is ``sdtrt_ignored_fields``, the request's keys that changed nothing.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtrt import __version__
from sdtrt.client.apps.a1111_requests import (
    SCHEDULER_NAMES,
    Job,
    UserOptions,
    _Request,
    a1111_defaults,
    open_image,
    refuse,
    sampler_options,
)
from sdtrt.client.client import Progress
from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.hires import HIRES_UPSCALERS
from sdtrt.contract.outputs import png_info as png_text
from sdtrt.contract.prometheus import samples
from sdtrt.contract.samplers import DEFAULT_RHO, SAMPLERS, SCHEDULE_TYPES
from sdtrt.contract.spec import Catalog, ModelSpec
from sdtrt.requests.generation import Generation
from sdtrt.requests.infotext import check_infotext, parse_infotext

# The /cmd-flags a client may see (A1111's names); the rest (paths, the addresses behind the gateway) stay here.
PUBLIC_FLAGS = ("api", "nowebui", "listen", "port", "api_auth")
# Schedules A1111 computes from the model's own sigmas (its "need_inner_model")
INNER_MODEL_SCHEDULES = ("Uniform", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta")


def a1111_error(status: int, name: str, detail: Any, message: str,
                headers: dict[str, str] | None = None) -> JSONResponse:
    """A1111's error body: the exception's type, its detail, and its text."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": name, "detail": detail, "body": "", "errors": message})


def encode_png(image: np.ndarray, infotext: str | None = None) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=png_text(infotext) if infotext else None)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def generation_response(body: _Request, settings: dict[str, Any], result: Generation, spec: ModelSpec,
                        job: Job, ignored: list[str]) -> dict[str, Any]:
    """A1111's txt2img/img2img answer: the pictures (unless send_images is false), the request echoed without its
    pictures, and ``info``."""
    parameters = body.model_dump()
    parameters.pop("init_images", None)
    parameters.pop("mask", None)
    images = [encode_png(im, info) for im, info in zip(result.images, result.infotexts)] if body.send_images else []
    return {"images": images, "parameters": parameters,
            "info": json.dumps(info(body, settings, result, spec, job, ignored))}


def info(body: _Request, settings: dict[str, Any], result: Generation, spec: ModelSpec, job: Job,
         ignored: list[str]) -> dict[str, Any]:
    """A1111's ``info`` of a generation (its processing's js()): what was drawn, seed by seed."""
    vae = spec.extra.get("vae") or {}
    count = len(result.seeds)
    return {
        "prompt": settings["prompt"], "all_prompts": [settings["prompt"]] * count,
        "negative_prompt": settings["negative_prompt"],
        "all_negative_prompts": [settings["negative_prompt"]] * count,
        "seed": result.seeds[0] if result.seeds else settings["seed"], "all_seeds": result.seeds,
        "subseed": settings["subseed"], "all_subseeds": [settings["subseed"] + i for i in range(count)],
        "subseed_strength": body.subseed_strength, "width": body.width, "height": body.height,
        "sampler_name": settings["sampler"], "cfg_scale": body.cfg_scale, "steps": body.steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": spec.name or spec.model_name, "sd_model_hash": spec.model_hash,
        "sd_vae_name": vae.get("name"), "sd_vae_hash": vae.get("sha256", "")[:10] or None,
        "seed_resize_from_w": body.seed_resize_from_w, "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": settings.get("denoising_strength"), "extra_generation_params": {},
        # (a script's grids come first: A1111 says where its pictures start)
        "index_of_first_image": getattr(result, "index_of_first_image", 0), "infotexts": result.infotexts, "styles": body.styles or [],
        "job_timestamp": job.timestamp, "clip_skip": settings["clip_skip"],
        "is_using_inpainting_conditioning": False, "version": f"sdtrt {__version__}",
        "sdtrt_ignored_fields": ignored,
    }


# --- lists -----------------------------------------------------------------------------------------------------
def sampler_list() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": list(s.aliases), "options": {}} for name, s in SAMPLERS.items()]


def scheduler_list() -> list[dict[str, Any]]:
    names = {label: name for name, label in SCHEDULER_NAMES.items()}
    return [{"name": names[label], "label": label, "aliases": None, "default_rho": DEFAULT_RHO.get(label, -1),
             "need_inner_model": label in INNER_MODEL_SCHEDULES}
            for label in SCHEDULE_TYPES]


def latent_upscale_modes() -> list[dict[str, str]]:
    return [{"name": name} for name, u in HIRES_UPSCALERS.items() if u.latent_mode]


def upscaler_list(catalog: Catalog) -> list[dict[str, Any]]:
    """PIL's upscalers, then the upscaler models the server's models were exported with (--upscalers), by file
    stem as A1111 names the files of its models/ESRGAN."""
    plain = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
             for name, u in HIRES_UPSCALERS.items() if not u.latent_mode]
    models = {name: {"name": name, "model_name": name, "model_path": entry["file"], "model_url": None,
                     "scale": entry["scale"]}
              for spec in catalog.models.values() for name, entry in spec.upscalers.items()}
    return plain + list(models.values())


def realesrgan_list(catalog: Catalog) -> list[dict[str, Any]]:
    """The registered Real-ESRGAN models (A1111's models/RealESRGAN): the compact ones, and RRDB ones named so."""
    return [{"name": name, "path": entry["file"], "scale": entry["scale"]}
            for spec in catalog.models.values() for name, entry in spec.upscalers.items()
            if entry["architecture"] == "RealESRGAN Compact" or "realesrgan" in name.lower().replace("-", "")]


def face_restorer_list(catalog: Catalog) -> list[dict[str, Any]]:
    """The face restorers the server's models were exported with, in A1111's order (CodeFormer, GFPGAN); the
    folder (cmd_dir) is the server's business."""
    found = {name for spec in catalog.models.values() for name in spec.face_restorers}
    return [{"name": name, "cmd_dir": None} for name in ("CodeFormer", "GFPGAN") if name in found]


def sd_model_list(catalog: Catalog) -> list[dict[str, Any]]:
    """The server's models; ``filename`` is the checkpoint's file name (A1111 gives its path on the server's disk,
    which is nobody's business outside it)."""
    return [{"title": spec.title, "model_name": spec.name or spec.model_name, "hash": spec.model_hash,
             "sha256": spec.source_hash, "filename": Path(spec.source).name, "config": None}
            for spec in catalog.models.values()]


def lora_list(spec: ModelSpec) -> list[dict[str, Any]]:
    """A model's registered LoRAs (`sdtrt export --loras DIR`), as A1111's Lora extension lists them (``path``:
    the file's name)."""
    return [{"name": name, "alias": name, "path": Path(entry.get("source", entry["file"])).name,
             "metadata": {"sshs_model_hash": entry["hash"], "rank": entry["rank"]}}
            for name, entry in spec.loras.items()]


def embedding_list(spec: ModelSpec) -> dict[str, Any]:
    return {"loaded": {name: {"step": None, "sd_checkpoint": spec.model_hash, "sd_checkpoint_name": spec.title,
                              "shape": spec.text_hidden_size, "vectors": entry["vectors"]}
                       for name, entry in spec.embeddings.items()},
            "skipped": {}}


def vae_list(catalog: Catalog) -> list[dict[str, Any]]:
    """The VAEs the server's models were exported with (``--vae``, each part of its model's export) and those
    registered for requests to pick (``--vaes``), by A1111's name: the file's."""
    vaes = {}
    for spec in catalog.models.values():
        vae = spec.extra.get("vae") or {}
        if vae.get("name"):
            vaes[vae["name"]] = {"model_name": vae["name"], "filename": vae.get("file") or vae["name"]}
        for name in spec.vaes:
            vaes.setdefault(name, {"model_name": name, "filename": name})
    return list(vaes.values())


def style_list(styles: dict) -> list[dict[str, str]]:
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.values()]


def public_flags(flags: dict[str, Any] | None) -> dict[str, Any]:
    """The gateway's flags as A1111 names them; credentials, paths and the addresses of the servers behind it are
    left out (they say nothing a client needs and something an attacker wants)."""
    return {k: v for k, v in (flags or {}).items() if k in PUBLIC_FLAGS}


# --- pictures ----------------------------------------------------------------------------------------------
def png_info_response(image: Any) -> dict[str, Any]:
    """A1111's PNG Info: the infotext a picture carries, its other text chunks, and the infotext read into A1111's
    fields (``Size-1``/``Size-2`` for ``Size``, as A1111 splits it)."""
    if not isinstance(image, str) or not image:
        raise refuse("image", "a base64-encoded PNG")
    chunks = {k: v for k, v in open_image(image, "image").info.items() if isinstance(v, str)}
    text = chunks.pop("parameters", "")
    try:
        check_infotext(text, "image")
    except InvalidRequest as exc:
        raise refuse("image", f"its parameters text: {exc}") from None
    parameters: dict[str, Any] = {}
    if text:
        prompt, negative, params = parse_infotext(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **params}
        if "x" in params.get("Size", ""):
            parameters["Size-1"], parameters["Size-2"] = params["Size"].split("x", 1)
    return {"info": text, "items": chunks, "parameters": parameters}


def extras_response(result: Image.Image, chunks: dict[str, str], done: dict[str, Any], show: bool) -> dict[str, Any]:
    """A1111's Extras answer: the picture with its text chunks kept, and A1111's ``postprocessing`` text saying
    what was ``done``."""
    text = ", ".join(f"{k}: {v}" for k, v in done.items())
    if text:
        chunks = {**chunks, "postprocessing": text}
    pnginfo = PngInfo()
    for key, value in chunks.items():
        pnginfo.add_text(key, value)
    buffer = io.BytesIO()
    result.save(buffer, format="PNG", pnginfo=pnginfo)
    return {"html_info": f"<p>{html.escape(text)}</p>" if text else "",
            "image": base64.b64encode(buffer.getvalue()).decode("ascii") if show else None}


# --- state -------------------------------------------------------------------------------------------------
def options_response(mine: UserOptions, spec: ModelSpec) -> dict[str, Any]:
    """A user's A1111 options: A1111's defaults, those the user set (kept and read back as given, as A1111 keeps
    options it has no use for), and those sdtrt draws with as they are."""
    return {**a1111_defaults(), **mine.options, "sd_model_checkpoint": spec.title,
            "sd_checkpoint_hash": spec.source_hash, "CLIP_stop_at_last_layers": mine.clip_skip,
            "samples_format": "png", "enable_pnginfo": True,
            "randn_source": mine.randn_source,
            **sampler_options(mine)}


IDLE_PROGRESS = {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                 "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                           "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                           "sampling_steps": 0}}


def progress_response(job: Job | None, latest: Progress | None, skip_current_image: bool = False,
                      now: float | None = None) -> dict[str, Any]:
    """A1111's /progress of ``job`` (None: nothing under way), whose batch running now reported ``latest``."""
    if job is None:
        return copy.deepcopy(IDLE_PROGRESS)
    step, total = (latest.step, latest.total) if latest is not None else (0, 0)
    preview = None if skip_current_image or latest is None else latest.preview
    done = min(1.0, (job.done + (step / total if total else 0.0)) / max(job.count, 1))
    elapsed = (time.time() if now is None else now) - job.started
    return {
        "progress": done,
        "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
        "state": {"skipped": False, "interrupted": job.control.interrupted, "stopping_generation": False,
                  "job": job.kind, "job_count": job.count, "job_timestamp": job.timestamp, "job_no": job.done,
                  "sampling_step": step, "sampling_steps": total},
        "current_image": None if preview is None else encode_png(preview),
        "textinfo": f"batch {job.done + 1} of {job.count}, step {step} of {total}",
    }


def memory_response(metrics: str | None, error: str | None = None) -> dict[str, Any]:
    """A1111's /memory from the Triton server's own metrics text (its host's RAM, its GPUs' memory, GPUs summed):
    the gateway's process is not where the models run. ``error`` says why there are none."""
    if metrics is None:
        message = error or "no --metrics-url"
        return {"ram": {"error": message}, "cuda": {"error": message}}
    values: dict[str, float] = {}
    for name, _, value in samples(metrics):
        values[name] = values.get(name, 0.0) + value

    def usage(prefix: str) -> dict[str, Any]:
        total, used = values.get(f"{prefix}_total_bytes"), values.get(f"{prefix}_used_bytes")
        if total is None or used is None:
            return {"error": "unavailable"}
        return {"free": total - used, "used": used, "total": total}

    gpu = usage("nv_gpu_memory")
    return {"ram": usage("nv_cpu_memory"), "cuda": gpu if "error" in gpu else {"system": gpu}}
