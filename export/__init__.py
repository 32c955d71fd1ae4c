"""Checkpoint -> ONNX (-> TensorRT) -> model repository, with the spec that describes it all.

    from sdtrt.export import export_model
    spec = export_model("models/default", "repos/default")
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from sdtrt import __version__
from sdtrt.contract.errors import UsageError
from sdtrt.contract.files import copy_atomic, no_space_is_disk_full, repository_lock, writer_gone
from sdtrt.contract.samplers import schedule_table
from sdtrt.contract.spec import (
    CAPTION_ROWS,
    CAPTION_TOKENS,
    CLIP_TEXTS,
    ENGINES,
    HYPERTILE,
    SPEC_FILENAME,
    SPEC_VERSION,
    UPSCALE_H,
    UPSCALE_W,
    Catalog,
    ComponentSpec,
    ModelSpec,
    load_catalog,
    safe_name,
)
from sdtrt.export.networks.checkpoint import (
    Checkpoint,
    checkpoint_sha256,
    file_sha256,
    folder_sha256,
    fuse_loras,
    load_checkpoint,
    override_vae,
    parse_lora,
)
from sdtrt.export.networks.descriptors import (
    BATCH,
    CONTEXT,
    LATENT_H,
    LATENT_W,
    OPSET,
    TEXT_BATCH,
    UNET_BATCH,
    align_your_steps_levels,
    clip_skip_layers,
    descriptors,
    dim_ranges,
)
from sdtrt.export.networks.lora import lora_slots, register_embeddings, register_loras
from sdtrt.export.networks.onnx_export import check_onnx, export_onnx, verify_onnx
from sdtrt.export.options import ExportOptions
from sdtrt.export.tensorrt import EngineOptions, build_engines, refit_engine, refitted_filename
from sdtrt.export.hypertile import hypertile_descriptors
from sdtrt.export.postprocessing import FOLDERS as POSTPROCESSING_FOLDERS
from sdtrt.export.postprocessing import of_spec, read_postprocessing
from sdtrt.export.vaes import fit_latent_preview, register_vaes
from sdtrt.export.controlnets import register_controlnets
from sdtrt.export.networks.controlnet import residual_dims, residual_specs
from sdtrt.model_repository.build import write_model, write_networks, write_repository
from sdtrt.model_repository.configs import ServingOptions
from sdtrt.requests.extra_networks import EMBEDDING_VECTORS, LORA_NETWORKS, lora_rank
from sdtrt.requests.request import request_fields

log = logging.getLogger("sdtrt.export")

def onnx_path(key: str, component: str) -> str:
    """Where a model's network lives in the repository: Triton's <model>/<version>/model.onnx layout, the Triton
    model named <key>__<network>."""
    return f"{key}__{component}/1/model.onnx"


def tokenizer_dir(key: str) -> str:
    return f"{key}__tokenizer/1/clip_tokenizer"


def model_key(model: str | Path, name: str | None = None) -> str:
    """A model's name in a repository: ``name``, else the file's stem or the folder's name (A1111's "Model")."""
    path = Path(model)
    return safe_name(name or (path.name if path.is_dir() else path.stem))


def export_model(model: str | Path, out: str | Path, options: ExportOptions | None = None, *, report=print,
                 **changes) -> ModelSpec:
    """Export every network of ``model`` to ONNX and add it to the model repository ``out`` (created if need be),
    with its spec and Triton configs; the first model of a repository, or one exported with ``default``, is what
    requests that name no model get. ``options`` (ExportOptions; keyword ``changes`` replace its fields) say
    under which name, with which LoRAs, limits and engines."""
    options = replace(options or ExportOptions(), **changes)
    if options.hypertile and options.engines is not None:
        raise UsageError("--hypertile with --engines: the Hypertile variants run on onnxruntime (their tiles are "
                         "shapes TensorRT would need as profile values); export one without the other")
    out = Path(out)
    with repository_lock(out, report=report):
        remove_leftovers(out, report)
    key = model_key(model, options.name)
    source_sha = checkpoint_sha256(model, options.progress)
    inputs = export_key(source_sha, **options.key_inputs(key))
    done = complete_export(out, key, inputs)
    if done is not None:
        report(f"{out}: {key} is already exported from the same inputs ({inputs[:12]}); nothing to do")
        if options.default and load_catalog(out).default != key:
            with repository_lock(out, report=report):
                catalog = load_catalog(out)
                catalog.default = key
                catalog.save(out)
                write_repository(out, catalog, options.served)
            report(f"{out}: {key} is now the default model")
        return done
    existing = current_catalog(out)
    if existing is not None:  # refused before the (long) export rather than after it
        check_serving(out, existing, key, options.backend)
        prior = complete_export(out, key, base_key(source_sha, key, options), "export_base")
        if prior is not None and not prior.extra.get(ENGINES):  # only the upscaler or face folder changed
            return add_postprocessing(out, prior, inputs, options, report)
    # a full disk while a library writes its own files (the ONNX exporter, the tokenizer) is DiskFull too
    with no_space_is_disk_full(out), building(out) as work:
        spec = _export(model, work, key, inputs, source_sha, options, report)
        # The long part ran unlocked, in a folder of its own; joining reads the catalog, moves the models in, saves
        # the catalog and removes stale models: another export into `out` between the read and the cleanup would
        # lose its models, so one process at a time.
        with repository_lock(out, report=report):
            catalog = join_repository(work, out, spec, options.served, options.default)
    report(f"Triton model repository: {out}, models {', '.join(catalog.models)} (default {catalog.default}; "
           f"networks on the {options.backend!r} backend)")
    return spec


def _export(model, repo: Path, key: str, inputs: str, source_sha: str, options: ExportOptions, report) -> ModelSpec:
    """The export itself, into ``repo`` (a folder beside the repository, joined to it when everything is written):
    the networks, the tokenizer, the engines, this model's own Triton configs."""
    base = base_key(source_sha, key, options)  # (of the options as given, as export_model computes it)
    ckpt = load_checkpoint(model, options.config, allow_pickle=options.allow_pickle,
                           prediction_type=options.prediction_type, report=report, sha256=source_sha)
    if options.vae is not None:
        ckpt = override_vae(ckpt, Path(options.vae), report)
    ckpt = fuse_loras(ckpt, [parse_lora(text) for text in options.loras], allow_pickle=options.allow_pickle)
    pipe = ckpt.pipe
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = int(pipe.unet.config.sample_size) * factor
    options = options.fitted(native, factor)
    text_max_length = int(pipe.tokenizer.model_max_length)
    if text_max_length > 10_000:  # a tokenizer folder without model_max_length: CLIP's window is the text model's
        text_max_length = int(pipe.text_encoder.config.max_position_embeddings)
    registered, slots = register_extra_networks(pipe, repo, key, options, report)
    dims = dim_ranges(max_batch=options.max_batch, min_size=options.min_size, native_size=native,
                      max_size=options.max_size, vae_scale_factor=factor, text_max_length=text_max_length,
                      max_chunks=options.max_chunks, max_lora_rank=options.max_lora_rank if slots else 0)

    residuals = residual_specs(dict(pipe.unet.config)) if options.controlnet_dir is not None else ()
    networks = descriptors(pipe, text_max_length, slots, options.tiling, residuals)
    controlnets: dict = {}
    if residuals:
        unet = next(desc for desc in networks if desc.name == "unet")
        controlnet_networks, controlnets = register_controlnets(pipe, unet, Path(options.controlnet_dir),
                                                                options.allow_pickle, report)
        networks += controlnet_networks
        dims = {**dims, **residual_dims(dict(pipe.unet.config), dims)}
    hypertiled, hypertile_layers = hypertile_descriptors(pipe, networks) if options.hypertile else ([], [])
    networks += hypertiled
    vae_networks, vaes = register_vaes(pipe, Path(options.vae_dir), options.allow_pickle, report) \
        if options.vae_dir is not None else ([], {})
    post = read_postprocessing(options, report)
    networks += vae_networks + post.networks
    dims = {**dims, **post.dims()}
    components = export_networks(networks, repo, key, dims, text_max_length, options.progress, report)
    pipe.tokenizer.save_pretrained(str(repo / tokenizer_dir(key)))
    spec = build_spec(ckpt, key, components, dims, options, native=native, text_max_length=text_max_length,
                      registered=post.registered())
    spec = post.applied(spec)
    extra = {**spec.extra, "export_key": inputs, "export_base": base, **({HYPERTILE: hypertile_layers} if hypertiled else {})}
    spec = replace(spec, extra=extra, vaes=vaes, controlnets=controlnets, **registered)
    if options.engines is not None:
        spec = build_engines(repo, spec, options.engines, report, options.progress)
    write_model(repo, spec, options.served)
    return spec


def register_extra_networks(pipe, repo: Path, key: str, options: ExportOptions, report) -> tuple[dict, dict | None]:
    """Pack the LoRAs and embeddings requests may use into the model's tokenizer folder (its prompt assets):
    ({"loras": ..., "embeddings": ...} for the spec, the LoRA slots of each network or None without LoRAs)."""
    lora_dir, embedding_dir, max_lora_rank = options.lora_dir, options.embedding_dir, options.max_lora_rank
    allow_pickle = options.allow_pickle
    assets = Path(tokenizer_dir(key)).parent
    registered: dict = {"loras": {}, "embeddings": {}}
    if getattr(pipe, "text_encoder_2", None) is not None and (lora_dir is not None or embedding_dir is not None):
        raise UsageError("--loras/--embeddings are not served for SDXL models yet: fuse a LoRA with --lora FILE:SCALE")
    slots = None
    if lora_dir is not None:
        slots = {net: lora_slots(getattr(pipe, net), net) for net in LORA_NETWORKS}
        registered["loras"] = register_loras(pipe, Path(lora_dir), slots, repo / assets / "loras", allow_pickle, report)
        too_big = {name: lora_rank(entry) for name, entry in registered["loras"].items()
                   if lora_rank(entry) > max_lora_rank}
        if too_big:
            raise UsageError(f"LoRAs {too_big} have a larger rank than --max-lora-rank {max_lora_rank}; raise it")
    if embedding_dir is not None:
        registered["embeddings"] = register_embeddings(Path(embedding_dir), int(pipe.text_encoder.config.hidden_size),
                                                       repo / assets / "embeddings", allow_pickle, report)
    for entries in registered.values():  # the repository is moved into place later: paths relative to its root
        for entry in entries.values():
            entry["file"] = Path(entry["file"]).relative_to(repo).as_posix()
    return registered, slots


def export_key(source_sha: str, **inputs) -> str:
    """What an export is made of (the checkpoint's bytes, its LoRAs' and config's, every option, sdtrt's version):
    the same key means the same repository."""
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
    for folder in ("lora_dir", "embedding_dir", "vae_dir", *POSTPROCESSING_FOLDERS):  # their files' contents, not names
        if inputs[folder] is not None and Path(inputs[folder]).is_dir():
            inputs[folder] = folder_sha256(Path(inputs[folder]), progress=False)
    record = {"source": source_sha, "loras": loras, "vae": vae_sha, "config": config_sha, "sdtrt": __version__,
              "spec": SPEC_VERSION,
              **{name: plain(value) for name, value in inputs.items()}}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def base_key(source_sha: str, key: str, options: ExportOptions) -> str:
    """The export's key but for its upscaler and face restorer folders: an export that differs from an earlier one
    only there adds and removes those networks (add_postprocessing) instead of exporting again."""
    return export_key(source_sha, **{**options.key_inputs(key), **dict.fromkeys(POSTPROCESSING_FOLDERS)})


def complete_export(repo: Path, key: str, inputs: str, field: str = "export_key") -> ModelSpec | None:
    """The model's spec if the repository holds a finished export of these ``inputs`` under ``key`` (its catalog
    entry is written last, after every network and config is in place); ``field``: which key of the export to
    compare (``export_base``: all but the upscaler folder)."""
    try:
        spec = load_catalog(repo).models.get(key)
    except UsageError:
        return None
    if spec is None or spec.extra.get(field) != inputs:
        return None
    files = [repo / c.onnx for c in spec.components.values()]
    files += [repo / spec.triton_name(c.name) / "config.pbtxt" for c in spec.components.values()]
    return spec if all(f.is_file() for f in files) else None


@contextlib.contextmanager
def building(final: Path):
    """A folder beside ``final`` to export into; removed if the export fails or is interrupted, so nothing half
    made ever shows in the repository."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # its pid in its name: a later export tells a killed one's leftover (remove_leftovers) from a running one's
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_postprocessing(out: Path, spec: ModelSpec, inputs: str, options: ExportOptions, report) -> ModelSpec:
    """An exported model with its upscaler and face restorer folders read again: the new or changed files'
    networks exported and joined, those of files gone removed, the rest as they are (a file dropped into a folder
    is served after this and `sdtrt models load`, without a restart or a whole export)."""
    post = read_postprocessing(options, report)
    wanted, had = post.files(), of_spec(spec).files()
    fresh = [desc for desc in post.networks if desc.name not in spec.components or had.get(desc.name) != wanted[desc.name]]
    gone = [name for name in had if name not in wanted]
    with no_space_is_disk_full(out), building(out) as work:
        spec = post.applied(spec)
        exported = export_networks(fresh, work, spec.key, spec.dims, spec.text_max_length, options.progress, report)
        components = {**{n: c for n, c in spec.components.items() if n not in gone}, **exported}
        spec = replace(spec, components=components, extra={**spec.extra, "export_key": inputs})
        write_networks(work, spec, list(exported), options.served)
        with repository_lock(out, report=report):
            join_repository(work, out, spec, options.served, options.default)
            for name in gone:
                shutil.rmtree(out / spec.triton_name(name), ignore_errors=True)
    names = [*post.upscalers, *post.face_restorers, *post.interrogators]
    report(f"{out}: {spec.key}'s upscalers, face restorers and interrogators: {', '.join(names) or 'none'} ({len(fresh)} "
           f"exported, {len(gone)} removed); `sdtrt models load {spec.key}` serves them")
    return spec


def remove_leftovers(repo: Path, report) -> None:
    """Remove what a killed earlier export or write left (its work folder beside ``repo``, temporary files and
    replaced models in it), so it fills no disk and no reader sees it; what a running process writes stays
    (writer_gone). Called under the repository's lock, so no join is halfway through meanwhile."""
    beside = f".{glob.escape(repo.name)}"
    found = [*repo.parent.glob(beside + ".partial-*"), *repo.parent.glob(beside + ".old-*")]
    if repo.is_dir():
        found += [path for path in repo.rglob(".*") if ".partial" in path.name or ".old-" in path.name]
    for path in found:
        if writer_gone(path.name):
            report(f"{path}: removing what an interrupted export left")
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def join_repository(work: Path, final: Path, spec: ModelSpec, serving: ServingOptions, default: bool) -> Catalog:
    """Move a finished export's Triton models into the repository (replacing the model's older ones), then add it
    to the catalog, then regenerate the configs that span every model (the jobs). A repository written by an
    older sdtrt (another spec format) is replaced whole."""
    final.mkdir(parents=True, exist_ok=True)
    try:
        catalog = load_catalog(final) if (final / SPEC_FILENAME).is_file() else None
    except UsageError:  # an older format: what it served cannot join a catalog of this version
        stale = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(stale)
        final.mkdir()
        shutil.rmtree(stale, ignore_errors=True)
        catalog = None
    if catalog is not None:
        check_serving(final, catalog, spec.key, serving.backend)
    for part in sorted(work.iterdir()):
        target = final / part.name
        if target.exists():
            old = final / f".{part.name}.old-{os.getpid()}"
            target.rename(old)
            part.rename(target)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            part.rename(target)
    catalog = catalog or Catalog(spec.key, {})
    catalog.models[spec.key] = spec
    if default:
        catalog.default = spec.key
    catalog.save(final)
    write_repository(final, catalog, serving)
    return catalog


def current_catalog(repo: Path) -> Catalog | None:
    """The repository's catalog; None for a new repository or one an older sdtrt wrote (it gets replaced)."""
    try:
        return load_catalog(repo) if (repo / SPEC_FILENAME).is_file() else None
    except UsageError:
        return None


def check_serving(repo: Path, catalog: Catalog, key: str, backend: str) -> None:
    """Serving options are the repository's (the last export's apply to every model): refuse, before anything
    moves, an export whose backend the repository's other models cannot be served on."""
    others = [other for other in catalog.models if other != key]
    with_engines = [other for other in others if catalog.models[other].extra.get(ENGINES)]
    if backend == "tensorrt":
        lacking = [other for other in others if other not in with_engines]
        if lacking:
            raise UsageError(f"{repo} also serves {', '.join(lacking)} without TensorRT engines; build theirs first "
                             f"(`sdtrt build-engines {repo} --model {lacking[0]}`) or export this one into another "
                             "repository")
    elif with_engines:
        raise UsageError(f"{repo} serves TensorRT engines ({', '.join(with_engines)}): export this model with "
                         "--format trt to add it, or into another repository")


def export_networks(descs, repo: Path, key: str, dims, text_max_length: int, progress: bool,
                    report) -> dict[str, ComponentSpec]:
    """Each network: torch -> ONNX, onnx.checker, then onnxruntime against torch at two shapes: the smallest sizes
    (fast even for SD-sized weights) and an odd, non-square, 2-chunk one."""
    lo_h, lo_w = dims[LATENT_H].min, dims[LATENT_W].min
    check_dims = [
        {BATCH: 1, TEXT_BATCH: 2, UNET_BATCH: 2, LATENT_H: lo_h, LATENT_W: lo_w + 1, CONTEXT: text_max_length,
         UPSCALE_H: 32, UPSCALE_W: 48},
        {BATCH: 2, TEXT_BATCH: 3, UNET_BATCH: 3, LATENT_H: lo_h + 2, LATENT_W: lo_w,
         CONTEXT: min(2 * text_max_length, dims[CONTEXT].max), UPSCALE_H: 64, UPSCALE_W: 16},
    ]
    for sizes, caption in zip(check_dims, ({CAPTION_ROWS: 1, CAPTION_TOKENS: 4, CLIP_TEXTS: 1},
                                           {CAPTION_ROWS: 3, CAPTION_TOKENS: 9, CLIP_TEXTS: 5})):
        sizes.update(caption)
    components = {}
    bar = tqdm(total=3 * len(descs), desc="export", unit="stage", disable=not progress)
    for desc in descs:
        path = repo / onnx_path(key, desc.name)
        bar.set_postfix_str(f"{desc.name}: torch -> ONNX")
        export_onnx(desc, path)
        bar.update()
        bar.set_postfix_str(f"{desc.name}: onnx.checker")
        check_onnx(path)
        bar.update()
        bar.set_postfix_str(f"{desc.name}: onnxruntime vs torch")
        err = verify_onnx(desc, path, check_dims)
        bar.update()
        report(f"{desc.name}: {onnx_path(key, desc.name)} (opset {OPSET}); onnxruntime vs torch max abs error "
               f"{err:.2e}")
        components[desc.name] = ComponentSpec(desc.name, onnx_path(key, desc.name), OPSET, desc.inputs, desc.outputs)
    bar.close()
    return components


def build_engines_and_configs(repo: str | Path, engines: EngineOptions, serving: ServingOptions = ServingOptions(),
                              model: str | None = None, report=print, progress: bool = True) -> ModelSpec:
    """TensorRT engines for one model of an exported repository (default: its default model), then the
    repository's Triton configs switched to ``tensorrt_plan``."""
    root = Path(repo)
    spec = build_engines(root, load_catalog(root).get(model), engines, report, progress)
    with repository_lock(root, report=report):
        catalog = load_catalog(root)  # as it is now: another model may have joined while the engines built
        catalog.models[spec.key] = spec
        catalog.save(root)
        return _switch_to_engines(root, catalog, spec, serving, report)


def _switch_to_engines(root: Path, catalog: Catalog, spec: ModelSpec, serving: ServingOptions, report) -> ModelSpec:

    lacking = [key for key, other in catalog.models.items() if not other.extra.get(ENGINES)]
    if lacking:  # one backend per repository: it switches once every model has its engines
        report(f"{spec.key}'s engines are built; {root} switches to TensorRT once {', '.join(lacking)} "
               f"{'has' if len(lacking) == 1 else 'have'} theirs (`sdtrt build-engines {root} --model {lacking[0]}`)")
        return spec
    write_repository(root, catalog, replace(serving, backend="tensorrt"))
    report(f"Triton model repository: {root} (every model's networks on TensorRT engines)")
    return spec


def refit_repository(repo: str | Path, model: str | Path, *, name: str | None = None, config: str | Path | None = None,
                     loras: tuple[str, ...] = (), report=print) -> ModelSpec:
    """New weights (another checkpoint of the same architecture, or the same one with LoRAs fused) into one
    model's refittable TensorRT engines (``name``, default: the repository's default model), without rebuilding
    them; the ONNX files and the spec follow."""
    root = Path(repo)
    catalog = load_catalog(root)
    old = catalog.get(name)
    manifest = old.extra.get(ENGINES, {})
    if old.loras or old.embeddings:
        raise UsageError(f"{old.key} has LoRAs or embeddings registered for requests; refit does not carry them over: "
                         "re-export it (with --loras/--embeddings) instead")
    stiff = [part for part, entry in manifest.items() if not entry.get("refittable")]
    if stiff or not manifest:
        raise UsageError(f"{old.key}'s engines {stiff or '(none)'} are not refittable: build them with --refittable")
    f = old.vae_scale_factor
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.refit-") as tmp:
        fresh = Path(tmp) / "repo"
        new = export_model(model, fresh, name=old.key, config=config, loras=loras, max_batch=old.dims[BATCH].max,
                           min_size=old.dims[LATENT_H].min * f, max_size=old.dims[LATENT_H].max * f,
                           max_chunks=old.max_chunks, max_pixel_steps=old.max_pixel_steps,
                           max_prompt_chars=old.field("prompt").max_length, report=report)
        if [c.inputs for c in new.components.values()] != [c.inputs for c in old.components.values()]:
            raise UsageError(f"{model} is not the same architecture as {old.key} in {repo}: rebuild instead")
        refitted = {}
        for part, entry in manifest.items():
            folder = root / old.triton_name(part) / "1"
            target = refitted_filename(entry["file"], new.extra.get("export_key") or new.source_hash)
            report(f"{part}: refitting {entry['file']} into {target}")
            refit_engine(folder / entry["file"], fresh / new.component(part).onnx, folder / target,
                         fp16=entry.get("fp16"))
            refitted[part] = {**entry, "file": target}
        with repository_lock(root, report=report):
            for part in manifest:  # the ONNX files follow the weights (an export or a later refit reads them)
                folder = old.triton_name(part)
                for produced in (fresh / folder / "1").glob("model.onnx*"):
                    copy_atomic(produced, root / folder / "1" / produced.name)
            catalog = load_catalog(root)
            spec = replace(old, model_name=new.model_name, source=new.source, source_hash=new.source_hash,
                           extra={**new.extra, ENGINES: refitted})
            catalog.models[spec.key] = spec
            catalog.save(root)
            # the configs now name the new engine files: a server picks them up when its models are loaded again
            # (`sdtrt refit --url` does that through model control); the old files stay until then
            write_repository(root, catalog, ServingOptions(backend="tensorrt"))
    return spec


def build_spec(ckpt: Checkpoint, key: str, components: dict, dims: dict, options: ExportOptions, *, native: int,
               text_max_length: int, registered: dict[str, tuple[str, ...]] | None = None) -> ModelSpec:
    """The model's spec, from its checkpoint, its exported networks and the (fitted) export options
    (``registered``: the names of its upscalers and face restorers, the request fields' choices)."""
    pipe = ckpt.pipe
    return ModelSpec(
        name=key,
        model_name=ckpt.name,
        source=ckpt.source,
        source_hash=ckpt.sha256,
        latent_channels=int(pipe.vae.config.latent_channels),
        vae_scale_factor=(factor := 2 ** (len(pipe.vae.config.block_out_channels) - 1)),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")),
        scheduler_config=_jsonable(dict(pipe.scheduler.config)),
        tokenizer=tokenizer_dir(key),
        text_max_length=text_max_length,
        text_hidden_size=int(components["text_encoder"].input(EMBEDDING_VECTORS).shape[2]),
        dims=dims,
        components=components,
        request=request_fields(native, options.min_size, options.max_size, factor, options.max_batch,
                               clip_layers=clip_skip_layers(pipe), max_prompt_chars=options.max_prompt_chars,
                               **(registered or {})),
        max_pixel_steps=options.max_pixel_steps,
        schedules=schedule_table(dict(pipe.scheduler.config)),
        align_your_steps=align_your_steps_levels(pipe),
        latent_preview=fit_latent_preview(pipe.vae, float(pipe.vae.config.scaling_factor), factor),
        extra={**({"loras": list(ckpt.loras)} if ckpt.loras else {}), **({"vae": ckpt.vae} if ckpt.vae else {}),
               # SDXL's VAE overflows in FP16 (its config's force_upcast; the fp16-fixed VAE says False): its
               # TensorRT engines are built in FP32
               **({"vae_fp32": True} if getattr(pipe, "text_encoder_2", None) is not None
                  and pipe.vae.config.get("force_upcast") else {})},
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
