"""Checkpoint -> ONNX (-> TensorRT) -> model repository, with the spec that describes it all.

    from sdtrt.export import export_model
    spec = export_model("models/default", "repos/default")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from sdtrt.export.checkpoint import (
    Checkpoint, checkpoint_sha256, fuse_loras, load_checkpoint, override_vae, parse_lora,
)
from sdtrt.export.descriptors import (
    BATCH, CONTEXT, LATENT_H, LATENT_W, OPSET, TEXT_BATCH, UNET_BATCH, descriptors, dim_ranges,
)
from sdtrt.export.onnx_export import check_onnx, export_onnx, verify_onnx
from sdtrt.errors import UsageError
from sdtrt.model_repository.build import write_repository
from sdtrt.model_repository.configs import ServingOptions
from sdtrt.request import request_fields
from sdtrt.samplers import schedule_table
from sdtrt.spec import SPEC_FILENAME, ComponentSpec, ExportLimits, ModelSpec

if TYPE_CHECKING:
    from sdtrt.export.tensorrt import EngineOptions

log = logging.getLogger("sdtrt.export")

TOKENIZER_DIR = "tokenizer/1/clip_tokenizer"


def onnx_path(component: str) -> str:
    """Where a component's ONNX lives in the repository: Triton's <model>/<version>/model.onnx layout."""
    return f"{component}/1/model.onnx"


def export_model(
    model: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    loras: tuple[str, ...] = (),
    vae: str | Path | None = None,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    max_batch: int = ExportLimits.max_batch,
    min_size: int = ExportLimits.min_size,
    max_size: int = ExportLimits.max_size,
    max_chunks: int = ExportLimits.max_chunks,
    max_pixel_steps: int | None = None,
    max_prompt_chars: int | None = None,
    serving: ServingOptions = ServingOptions(),
    engines: "EngineOptions | None" = None,
    progress: bool = True,
    report=print,
) -> ModelSpec:
    """Export every network of ``model`` to ONNX under ``out``, write the spec and the Triton configs.

    With ``engines`` (EngineOptions), also build FP16 TensorRT engines and serve the networks with them.
    ``max_pixel_steps`` (0: none) and ``max_prompt_chars`` are the per-request ceilings the spec records; by
    default they are sized from max_size, max_batch and max_chunks (see ExportLimits).
    """
    out = Path(out)
    source_sha = checkpoint_sha256(model, progress)
    key = export_key(source_sha, config=config, loras=loras, vae=vae, prediction_type=prediction_type, max_batch=max_batch,
                     min_size=min_size, max_size=max_size, max_chunks=max_chunks, max_pixel_steps=max_pixel_steps,
                     max_prompt_chars=max_prompt_chars, serving=serving, engines=engines)
    done = complete_export(out, key)
    if done is not None:
        report(f"{out}: already exported from the same inputs ({key[:12]}); nothing to do")
        return done
    with written_aside(out) as work:
        return _export(model, work, out, key, source_sha, config=config, loras=loras, vae=vae, allow_pickle=allow_pickle,
                       prediction_type=prediction_type, max_batch=max_batch, min_size=min_size, max_size=max_size,
                       max_chunks=max_chunks, max_pixel_steps=max_pixel_steps, max_prompt_chars=max_prompt_chars,
                       serving=serving, engines=engines, progress=progress, report=report)


def _export(model, repo: Path, final: Path, key: str, source_sha: str, *, config, loras, vae, allow_pickle, prediction_type,
            max_batch, min_size, max_size, max_chunks, max_pixel_steps, max_prompt_chars, serving, engines, progress,
            report) -> ModelSpec:
    """The export itself, into ``repo`` (a folder beside ``final`` that becomes it when everything is written)."""
    ckpt = load_checkpoint(model, config, allow_pickle=allow_pickle, prediction_type=prediction_type, report=report,
                           sha256=source_sha)
    if vae is not None:
        ckpt = override_vae(ckpt, Path(vae), report)
    ckpt = fuse_loras(ckpt, [parse_lora(text) for text in loras])
    pipe = ckpt.pipe
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = int(pipe.unet.config.sample_size) * factor
    if min_size % factor or max_size % factor or not 0 < min_size <= native <= max_size:
        raise UsageError(
            f"--min-size {min_size} / --max-size {max_size} must be multiples of {factor} around the model's "
            f"native size {native}"
        )
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}")
    text_max_length = int(pipe.tokenizer.model_max_length)
    if text_max_length > 10_000:  # a tokenizer folder without model_max_length: CLIP's window is the text model's
        text_max_length = int(pipe.text_encoder.config.max_position_embeddings)
    dims = dim_ranges(max_batch=max_batch, min_size=min_size, native_size=native, max_size=max_size,
                      vae_scale_factor=factor, text_max_length=text_max_length, max_chunks=max_chunks)

    components = export_networks(descriptors(pipe, text_max_length), repo, dims, text_max_length, progress, report)
    pipe.tokenizer.save_pretrained(str(repo / TOKENIZER_DIR))
    limits = dict(
        max_pixel_steps=ExportLimits.pixel_steps(max_size, max_batch) if max_pixel_steps is None else max_pixel_steps,
        max_prompt_chars=ExportLimits.prompt_chars(max_chunks) if max_prompt_chars is None else max_prompt_chars,
    )
    spec = build_spec(ckpt, components, dims, factor, native, min_size, max_size, max_batch, text_max_length, **limits)
    spec = replace(spec, extra={**spec.extra, "export_key": key})
    spec.save(repo)
    report(f"spec: {final / SPEC_FILENAME}")
    if engines is not None:
        return build_engines_and_configs(repo, spec, engines, serving, report, progress)
    write_repository(repo, spec, serving)
    report(f"Triton model repository: {final} (networks on the {serving.backend!r} backend)")
    return spec


def export_key(source_sha: str, **inputs) -> str:
    """What an export is made of (the checkpoint's bytes, its LoRAs' and config's, every option, sdtrt's version):
    the same key means the same repository."""
    from dataclasses import asdict, is_dataclass

    from sdtrt import __version__
    from sdtrt.export.checkpoint import file_sha256, folder_sha256
    from sdtrt.spec import SPEC_VERSION

    def plain(value):
        if is_dataclass(value):
            return asdict(value)
        return value

    loras = [(file_sha256(path, progress=False) if path.is_file() else str(path), scale)
             for path, scale in (parse_lora(text) for text in inputs.pop("loras"))]
    vae = inputs.pop("vae")
    vae_sha = file_sha256(Path(vae), progress=False) if vae is not None and Path(vae).is_file() else vae
    config = inputs.pop("config")
    config_sha = folder_sha256(Path(config), progress=False) if config is not None else None
    record = {"source": source_sha, "loras": loras, "vae": vae_sha, "config": config_sha, "sdtrt": __version__,
              "spec": SPEC_VERSION,
              **{name: plain(value) for name, value in inputs.items()}}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def complete_export(repo: Path, key: str) -> ModelSpec | None:
    """The repository's spec if it is a finished export of ``key`` (every network and config in place)."""
    from sdtrt.spec import load_spec

    if not (repo / SPEC_FILENAME).is_file():
        return None
    try:
        spec = load_spec(repo)
    except UsageError:
        return None
    files = [repo / c.onnx for c in spec.components.values()] + [repo / c.name / "config.pbtxt"
                                                                  for c in spec.components.values()]
    return spec if spec.extra.get("export_key") == key and all(f.is_file() for f in files) else None


@contextlib.contextmanager
def written_aside(final: Path):
    """A folder beside ``final`` to export into, swapped in for ``final`` only once everything is written: an
    interrupted or failed export leaves ``final`` as it was (and no half repository that looks complete)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def export_networks(descs, repo: Path, dims, text_max_length: int, progress: bool, report) -> dict[str, ComponentSpec]:
    """Each network: torch -> ONNX, onnx.checker, then onnxruntime against torch at two shapes: the smallest sizes
    (fast even for SD-sized weights) and an odd, non-square, 2-chunk one."""
    lo_h, lo_w = dims[LATENT_H].min, dims[LATENT_W].min
    check_dims = [
        {BATCH: 1, TEXT_BATCH: 2, UNET_BATCH: 2, LATENT_H: lo_h, LATENT_W: lo_w + 1, CONTEXT: text_max_length},
        {BATCH: 2, TEXT_BATCH: 3, UNET_BATCH: 3, LATENT_H: lo_h + 2, LATENT_W: lo_w,
         CONTEXT: min(2 * text_max_length, dims[CONTEXT].max)},
    ]
    components = {}
    bar = tqdm(total=3 * len(descs), desc="export", unit="stage", disable=not progress)
    for desc in descs:
        path = repo / onnx_path(desc.name)
        bar.set_postfix_str(f"{desc.name}: torch -> ONNX")
        export_onnx(desc, path)
        bar.update()
        bar.set_postfix_str(f"{desc.name}: onnx.checker")
        check_onnx(path)
        bar.update()
        bar.set_postfix_str(f"{desc.name}: onnxruntime vs torch")
        err = verify_onnx(desc, path, check_dims)
        bar.update()
        report(f"{desc.name}: {onnx_path(desc.name)} (opset {OPSET}); onnxruntime vs torch max abs error {err:.2e}")
        components[desc.name] = ComponentSpec(desc.name, onnx_path(desc.name), OPSET, desc.inputs, desc.outputs)
    bar.close()
    return components


def build_engines_and_configs(repo: str | Path, spec: ModelSpec, engines: "EngineOptions",
                              serving: ServingOptions = ServingOptions(), report=print, progress: bool = True) -> ModelSpec:
    """TensorRT engines for an exported repository, then its Triton configs switched to ``tensorrt_plan``."""
    from dataclasses import replace

    from sdtrt.export.tensorrt import build_engines, served_spec

    spec = served_spec(spec, engines)  # before building: refuses a static size or batch the export lacks
    manifest = build_engines(repo, spec, engines, report, progress)
    spec.save(repo)
    write_repository(repo, spec, replace(serving, backend="tensorrt", engines=manifest))
    report(f"Triton model repository: {repo} (networks on TensorRT engines)")
    return spec


def refit_repository(repo: str | Path, model: str | Path, *, config: str | Path | None = None,
                     loras: tuple[str, ...] = (), report=print) -> ModelSpec:
    """New weights (another checkpoint of the same architecture, or the same one with LoRAs fused) into an
    export's refittable TensorRT engines, without rebuilding them; the ONNX files and the spec follow."""
    import shutil
    import tempfile
    from dataclasses import replace

    from sdtrt.engines import load_manifest
    from sdtrt.export.tensorrt import refit_engine
    from sdtrt.spec import load_spec

    root = Path(repo)
    old = load_spec(root)
    manifest = load_manifest(root)
    stiff = [name for name, entry in manifest.items() if not entry.get("refittable")]
    if stiff:
        raise UsageError(f"engines {stiff} are not refittable: rebuild them with --refittable first")
    f = old.vae_scale_factor
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        new = export_model(model, tmp, config=config, loras=loras, max_batch=old.dims[BATCH].max,
                           min_size=old.dims[LATENT_H].min * f, max_size=old.dims[LATENT_H].max * f,
                           max_chunks=old.max_chunks, max_pixel_steps=old.max_pixel_steps,
                           max_prompt_chars=old.field("prompt").max_length, report=report)
        if [c.inputs for c in new.components.values()] != [c.inputs for c in old.components.values()]:
            raise UsageError(f"{model} is not the same architecture as the export in {repo}: rebuild instead")
        for name, entry in manifest.items():
            report(f"{name}: refitting {entry['file']}")
            refit_engine(root / name / "1" / entry["file"], Path(tmp) / new.component(name).onnx)
            for produced in (Path(tmp) / name / "1").glob("model.onnx*"):
                shutil.move(str(produced), root / name / "1" / produced.name)
    spec = replace(old, model_name=new.model_name, source=new.source, source_hash=new.source_hash, extra=new.extra)
    spec.save(root)
    write_repository(root, spec, ServingOptions(backend="tensorrt", engines=manifest))
    return spec


def build_spec(ckpt: Checkpoint, components, dims, factor, native, min_size, max_size, max_batch, text_max_length,
               max_pixel_steps: int, max_prompt_chars: int) -> ModelSpec:
    pipe = ckpt.pipe
    return ModelSpec(
        model_name=ckpt.name,
        source=ckpt.source,
        source_hash=ckpt.sha256,
        latent_channels=int(pipe.vae.config.latent_channels),
        vae_scale_factor=factor,
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")),
        scheduler_config=_jsonable(dict(pipe.scheduler.config)),
        tokenizer=TOKENIZER_DIR,
        text_max_length=text_max_length,
        text_hidden_size=int(pipe.text_encoder.config.hidden_size),
        dims=dims,
        components=components,
        request=request_fields(native, min_size, max_size, factor, max_batch,
                               clip_layers=int(pipe.text_encoder.config.num_hidden_layers),
                               max_prompt_chars=max_prompt_chars),
        max_pixel_steps=max_pixel_steps,
        schedules=schedule_table(),
        extra={**({"loras": list(ckpt.loras)} if ckpt.loras else {}), **({"vae": ckpt.vae} if ckpt.vae else {})},
    )


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


__all__ = ["export_model", "load_checkpoint", "onnx_path"]
