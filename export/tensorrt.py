"""ONNX -> FP16 TensorRT engines (polygraphy), one per network, with optimisation profiles from the spec.

* Profiles: every dynamic dim of an input gets the spec's (min, opt, max): batch 1..max, latent and image
  sizes from --min-size..--max-size (opt: the model's native size), text context 77..77*k so long prompts
  work. ``static_size``/``static_batch`` pin them to one value (faster kernels, one resolution).
* A timing cache shared by every build (``REPO/trt_timing.cache``) makes rebuilds and the other networks quick.
* ``refittable`` engines can take new weights (a LoRA fused into the checkpoint) without a rebuild:
  :func:`refit_engine` reads them from a re-exported ONNX with the same graph.
* Engine files are named after the network, the GPU, the TensorRT version and a hash of the profile and
  flags (``unet.NVIDIA-H100-PCIe.trt10.7.0.a1b2c3d4.plan``), and the spec's engine manifest records them; the
  Triton configs and the local runner load exactly those names, so a stale engine is never picked up.

Needs an NVIDIA GPU and the ``tensorrt`` package (``pip install 'sdtrt[gpu]'``); nothing here runs elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from sdtrt.engines import gpu_name, require_tensorrt
from sdtrt.errors import SdtrtError, UsageError
from sdtrt.extra_networks import LORA_SUFFIX
from sdtrt.spec import BATCH, IMAGE_H, IMAGE_W, LATENT_H, LATENT_W, UNET_BATCH, ComponentSpec, ModelSpec

TIMING_CACHE = "trt_timing.cache"
# What --static-batch N fixes, per network: the dims that follow a request's images, as (least, most) rows per
# image. The VAE decoder takes exactly 1 row per image; the U-Net 2 with guidance (uncond + cond) and 1 without,
# so its profile keeps that narrow range (tuned for 2N). The VAE encoder keeps the export's range: img2img
# encodes one init image whatever the batch size, the hires fix every image.
STATIC_BATCH_ROWS = {"unet": {UNET_BATCH: (1, 2)}, "vae_decoder": {BATCH: (1, 1)}}


def engine_fp16(spec: ModelSpec, component: str, options: "EngineOptions") -> bool:
    """FP16 unless ``--fp32`` names the network, or it is the VAE of a model whose VAE overflows in FP16 (SDXL's
    own: the export records it as ``vae_fp32``)."""
    if network_of(component) in options.fp32:
        return False
    return not (component.startswith("vae") and spec.extra.get("vae_fp32"))


def network_of(component: str) -> str:
    """A LoRA variant is built as its network is (``unet_lora`` as ``unet``)."""
    return component.removesuffix(LORA_SUFFIX)


@dataclass(frozen=True)
class EngineOptions:
    static_size: tuple[int, int] | None = None  # (width, height) in pixels: one resolution only
    static_batch: int | None = None  # images per request: one batch size only
    refittable: bool = False  # keep weights refittable (LoRA swaps without a rebuild)
    fp32: tuple[str, ...] = ()  # networks to keep in FP32 (e.g. "vae_decoder" for VAEs that overflow in FP16)
    optimization_level: int = 3  # TensorRT's builder optimisation level (0-5; higher builds slower, may run faster)
    workspace_gib: float | None = None  # cap on the builder's scratch memory


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def profile_shapes(spec: ModelSpec, component: ComponentSpec, options: EngineOptions) -> dict[str, list[tuple[int, ...]]]:
    """input name -> [min, opt, max] shapes, from the spec's dim ranges (pinned where the options say)."""
    ranges = {name: (r.min, r.opt, r.max) for name, r in spec.dims.items()}
    if options.static_size is not None:
        width, height = options.static_size
        f = spec.vae_scale_factor
        for name, value in ((LATENT_W, width // f), (LATENT_H, height // f), (IMAGE_W, width), (IMAGE_H, height)):
            lo, _, hi = ranges[name]
            if not lo <= value <= hi:
                raise UsageError(f"--static-size {width}x{height} is outside the export's sizes ({spec.field('width').allowed()})")
            ranges[name] = (value, value, value)
    if options.static_batch is not None:
        n = options.static_batch
        for name, (least, most) in STATIC_BATCH_ROWS.get(network_of(component.name), {}).items():
            ranges[name] = (n * least, n * most, n * most)
    shapes = {}
    for tensor in component.inputs:
        picks = [[d if isinstance(d, int) else ranges[d][i] for d in tensor.shape] for i in range(3)]
        shapes[tensor.name] = [tuple(p) for p in picks]
    return shapes


def served_spec(spec: ModelSpec, options: EngineOptions) -> ModelSpec:
    """The spec that engines built with ``options`` serve: a static size or batch becomes the only value of the
    request's width/height (and no hires upscale) or batch_size, so that a request the engines cannot take is
    refused up front, naming its field, instead of failing inside the loop. The limits are recomputed from the
    export's dim ranges (never narrowed), so a later build with other options gets its own."""
    from dataclasses import replace

    from sdtrt.request import request_fields

    image = spec.dims[IMAGE_W]
    base = request_fields(image.opt, image.min, image.max, spec.vae_scale_factor, spec.dims[BATCH].max,
                          clip_layers=int(spec.field("clip_skip").maximum),
                          max_prompt_chars=spec.field("prompt").max_length)
    request = {**spec.request, **{name: base[name] for name in ("width", "height", "batch_size", "hr_scale")}}

    def only(name: str, value: float, flag: str) -> None:
        field = request[name]
        if not field.minimum <= value <= field.maximum or field.multiple_of and value % field.multiple_of:
            raise UsageError(f"{flag}: this export's {name} must be {field.allowed()}, got {value:g}")
        request[name] = replace(field, default=value, minimum=value, maximum=value)

    if options.static_size is not None:
        width, height = options.static_size
        only("width", width, f"--static-size {width}x{height}")
        only("height", height, f"--static-size {width}x{height}")
        only("hr_scale", 1.0, "--static-size")
    if options.static_batch is not None:
        only("batch_size", options.static_batch, f"--static-batch {options.static_batch}")
    return replace(spec, request=request)


def engine_filename(component: str, gpu: str, trt_version: str, shapes: dict, fp16: bool, refittable: bool,
                    level: int) -> str:
    key = json.dumps({"shapes": shapes, "fp16": fp16, "refit": refittable, "level": level}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{component}.{_slug(gpu)}.trt{trt_version}.{digest}.plan"


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict, *, fp16: bool, refittable: bool, level: int,
                 timing_cache: Path, workspace_gib: float | None) -> None:
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    extra = {}
    if workspace_gib:
        extra["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_gib * (1 << 30))}
    config = CreateConfig(fp16=fp16, profiles=[profile], refittable=refittable, builder_optimization_level=level,
                          load_timing_cache=str(timing_cache) if timing_cache.exists() else None, **extra)
    # GroupNorm-heavy networks (U-Net, VAE) parse best with TensorRT's native InstanceNormalization.
    network = network_from_onnx_path(str(onnx_path), flags=[trt.OnnxParserFlag.NATIVE_INSTANCENORM])
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, str(engine_path))


def build_engines(repo: str | Path, spec: ModelSpec, options: EngineOptions = EngineOptions(),
                  report: Callable[[str], None] = print, progress: bool = True) -> ModelSpec:
    """Build (or reuse) an engine per network of ``spec``'s model under ``repo``; returns the spec those engines
    serve (``served_spec``), with the engine manifest in it (``extra["engines"]``)."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from sdtrt.spec import ENGINES

    spec = served_spec(spec, options)  # before building: refuses a static size or batch the export lacks
    trt = require_tensorrt()
    root = Path(repo)
    gpu = gpu_name()
    manifest: dict[str, dict] = {}
    for name in tqdm(list(spec.components), desc="TensorRT", unit="engine", disable=not progress):
        component = spec.component(name)
        shapes = profile_shapes(spec, component, options)
        fp16 = engine_fp16(spec, name, options)
        filename = engine_filename(name, gpu, trt.__version__, shapes, fp16, options.refittable,
                                   options.optimization_level)
        path = root / spec.triton_name(name) / "1" / filename
        if path.is_file():
            report(f"{name}: reusing {path}")
        else:
            report(f"{name}: building {'FP16' if fp16 else 'FP32'} engine for {gpu} (TensorRT {trt.__version__})")
            build_engine(root / component.onnx, path, shapes, fp16=fp16, refittable=options.refittable,
                         level=options.optimization_level, timing_cache=root / TIMING_CACHE,
                         workspace_gib=options.workspace_gib)
        manifest[name] = {"file": filename, "gpu": gpu, "tensorrt": trt.__version__, "fp16": fp16,
                          "refittable": options.refittable,
                          "profile": {k: [list(s) for s in v] for k, v in shapes.items()}, "options": asdict(options)}
    return replace(spec, extra={**spec.extra, ENGINES: manifest})


def refit_engine(engine_path: Path, onnx_path: Path) -> None:
    """Swap new weights (same graph, e.g. a fused LoRA) into a refittable engine, in place."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    with open(engine_path, "rb") as f:
        engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
    if engine is None or not engine.refittable:
        raise UsageError(f"{engine_path} is not a refittable engine: build it with --refittable")
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise SdtrtError(f"refitting {engine_path} from {onnx_path} failed: is it the same network?")
    with open(engine_path, "wb") as f:
        f.write(engine.serialize())
