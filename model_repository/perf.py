"""perf_analyzer's input data for the job models and each network, from the spec (written at export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtrt.contract.files import write_atomic
from sdtrt.contract.spec import (
    BATCH,
    CONTEXT,
    IMAGE_H,
    IMAGE_W,
    IMG2IMG,
    INIT_IMAGE,
    LATENT_H,
    LATENT_W,
    TEXT_BATCH,
    TXT2IMG,
    UNET_BATCH,
    FACE_DETECT_H,
    FACE_DETECT_W,
    UPSCALE_H,
    UPSCALE_W,
    ModelSpec,
)
from sdtrt.model_repository.configs import (NEGATIVE_PIECES, PIECE_TEXTS, PIECE_WEIGHTS, TOKENIZER, TOKENIZER_FIELDS,
                                           leads_with_batch)
from sdtrt.requests.extra_networks import LORA_SUFFIX
from sdtrt.requests.prompts import attention_pieces
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest, job_fields

PERF_INPUT = "perf_input.json"  # written into each model's folder (Triton ignores files there)
PERF_PROMPT = "a lighthouse on a cliff at dawn, oil painting"


def _zeros(shape: list[int]) -> dict[str, Any]:
    count = 1
    for d in shape:
        count *= d
    return {"content": [0.0] * count, "shape": shape}


def tokenizer_input(spec: ModelSpec, fields: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer's input for the request's texts, as the job's plan sends them: the negative prompt's weighted
    pieces, then the prompt's."""
    negative, prompt = attention_pieces(fields["negative_prompt"]), attention_pieces(fields["prompt"])
    pieces = negative + prompt
    return {PIECE_TEXTS: {"content": [text for text, _ in pieces], "shape": [len(pieces)]},
            PIECE_WEIGHTS: {"content": [weight for _, weight in pieces], "shape": [len(pieces)]},
            NEGATIVE_PIECES: [len(negative)], **{name: [fields[name]] for name in TOKENIZER_FIELDS}}


def perf_inputs(spec: ModelSpec, default: bool = True) -> dict[str, dict[str, Any]]:
    """perf_analyzer --input-data JSON for a model's Triton models (and the jobs, for the default model), at the
    model's native size, one image, 20 steps."""
    fields = {name: field.default for name, field in spec.request.items()}
    fields.update(prompt=PERF_PROMPT, seed=42, steps=20)
    txt2img = {name: [fields[name]] for name in job_fields(Txt2ImgRequest)}
    native = spec.field("width").default // spec.vae_scale_factor
    size = native * spec.vae_scale_factor
    dims = {BATCH: 1, TEXT_BATCH: 1, UNET_BATCH: 1, LATENT_H: native, LATENT_W: native,
            CONTEXT: spec.text_max_length, IMAGE_H: size, IMAGE_W: size,
            # (an upscaler's tile, the face detector's picture)
            **{d: spec.dims[d].opt for d in (UPSCALE_H, UPSCALE_W, FACE_DETECT_H, FACE_DETECT_W) if d in spec.dims}}
    img2img = {name: [fields[name]] for name in job_fields(Img2ImgRequest)}
    img2img[INIT_IMAGE] = {"content": [128] * (size * size * 3), "shape": [size, size, 3]}

    def network(name: str) -> dict[str, Any]:
        data = {}
        component = spec.component(name)
        for tensor in component.inputs:
            # (a network Triton does not batch takes its whole shape; a dim of its own at the spec's best size)
            shown = tensor.shape[1:] if leads_with_batch(component) else tensor.shape
            shape = [d if isinstance(d, int) else dims.get(d, spec.dims[d].opt) for d in shown] or [1]
            data[tensor.name] = _zeros(shape)
            if tensor.name == "input_ids":  # BOS, EOS, then padding
                data[tensor.name]["content"] = [49406, 49407] + [49407] * (len(data[tensor.name]["content"]) - 2)
            elif tensor.dtype.startswith("int"):  # per-row settings such as Clip skip: 1
                data[tensor.name]["content"] = [1] * len(data[tensor.name]["content"])
        return data

    jobs = {TXT2IMG: {"data": [txt2img]}, IMG2IMG: {"data": [img2img]}} if default else {}
    return {
        **jobs,
        spec.triton_name(TOKENIZER): {"data": [tokenizer_input(spec, fields)]},
        # (not the LoRA variants: their matrices would be megabytes of zeros; perf_analyzer makes its own data)
        **{spec.triton_name(name): {"data": [network(name)]} for name in spec.components
           if not name.endswith(LORA_SUFFIX)},
    }


def write_perf_inputs(repo: Path, spec: ModelSpec, default: bool = True) -> list[Path]:
    paths = []
    for model, data in perf_inputs(spec, default).items():
        path = Path(repo) / model / PERF_INPUT
        write_atomic(path, json.dumps(data))
        paths.append(path)
    return paths
