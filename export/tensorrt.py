"""ONNX -> FP16 TensorRT engines (polygraphy), one per network, with optimisation profiles from the spec.

* Strongly typed: an engine's precision is its ONNX graph's. TensorRT 11 removed weak typing (``BuilderFlag.FP16``
  and the other precision flags), so an FP16 engine is built from an FP16 copy of the network's ONNX
  (``model_fp16.onnx`` beside ``model.onnx``, written by :func:`convert_to_fp16`): weights and compute in FP16 as
  diffusers runs a ``torch.float16`` pipeline, the normalisations, the timestep embedding's sin/cos and float shape
  arithmetic in FP32, the inputs and outputs in the spec's dtypes. An FP32 engine (``--fp32``, a ``vae_fp32`` VAE)
  is built from ``model.onnx`` itself. The same code path builds on TensorRT 10 and 11.
* Profiles: every dynamic dim of an input gets the spec's (min, opt, max): batch 1..max, latent and image
  sizes from --min-size..--max-size (opt: the model's native size), text context 77..77*k so long prompts
  work. ``static_size``/``static_batch`` pin them to one value (faster kernels, one resolution).
* A timing cache shared by every build (``REPO/trt_timing.cache``) makes rebuilds and the other networks quick.
* ``refittable`` engines can take new weights (a LoRA fused into the checkpoint) without a rebuild:
  :func:`refit_engine` reads them from a re-exported ONNX with the same graph (an FP16 engine from that ONNX's FP16
  copy, made by the same conversion, so every weight keeps its name and type).
* Engine files are named after the network, the GPU, the TensorRT version and a hash of the profile, the flags
  and the FP16 conversion (``unet.NVIDIA-H100-PCIe.trt11.2.1.a1b2c3d4.plan``), and the spec's engine manifest
  records them; the Triton configs and the local runner load exactly those names, so a stale engine (another
  profile, a weakly typed build of an older sdtrt) is never picked up.

Building and refitting need an NVIDIA GPU and the ``tensorrt`` package (``pip install 'sdtrt[gpu]'``); the FP16
conversion needs only onnx and numpy, and runs (and is tested) anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm.auto import tqdm

from sdtrt.contract.errors import SdtrtError, UsageError
from sdtrt.contract.files import write_atomic
from sdtrt.contract.spec import (
    BATCH,
    ENGINES,
    IMAGE_H,
    IMAGE_W,
    LATENT_H,
    LATENT_W,
    UNET_BATCH,
    ComponentSpec,
    ModelSpec,
    dim_factor,
)
from sdtrt.pipeline.engines import gpu_name, require_tensorrt
from sdtrt.requests.extra_networks import LORA_SUFFIX
from sdtrt.requests.request import request_fields

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
    for name in ranges:  # a scaled dim (ControlNet residuals) follows its latent dim's pinned range
        base, factor = dim_factor(name)
        if factor > 1:
            ranges[name] = tuple(-(-v // factor) for v in ranges[base])
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
    # "typing" and the conversion are in the key so that an engine of another build recipe (the weakly typed FP16
    # engines of an older sdtrt, another version of the FP16 conversion) never passes for this one.
    key = json.dumps({"shapes": shapes, "fp16": fp16, "refit": refittable, "level": level, "typing": "strong",
                      "fp16_conversion": FP16_CONVERSION if fp16 else None, "tf32": not fp16}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"{component}.{_slug(gpu)}.trt{trt_version}.{digest}.plan"


def fp16_onnx_path(onnx_path: Path) -> Path:
    """Where the FP16 copy of a network's ONNX goes: beside it (``model.onnx`` -> ``model_fp16.onnx``)."""
    return onnx_path.with_name(f"{onnx_path.stem}_fp16{onnx_path.suffix}")


def engine_loaders(onnx_path: Path, shapes: dict, *, refittable: bool, level: int, timing_cache: Path,
                   memory_pool_limits: dict | None = None, tf32: bool = False):
    """polygraphy's (network, config) loaders for one build; nothing runs until the engine is built, so this needs
    no TensorRT. The network is strongly typed (its precision is its ONNX's) and the config sets no precision flag:
    the one recipe TensorRT 11 has, and TensorRT 10 builds it the same way. The parser keeps its default flags
    (TensorRT's native InstanceNormalization is the default on 10 and 11). ``tf32``: the FP32 engines' matrix
    products and convolutions may use TF32 tensor cores (FP32's range, 10-bit mantissas; TensorRT's own default,
    which polygraphy clears unless asked): an FP32 engine is FP32 for its range (the SDXL VAE overflows FP16), not
    its last bits. The FP16 engines keep it off, so their FP32 islands (norms, softmax) stay exact."""
    # polygraphy and TensorRT only on a GPU install (sdtrt[gpu]); the rest of export runs without
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    config = CreateConfig(profiles=[profile], refittable=refittable, builder_optimization_level=level,
                          load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
                          memory_pool_limits=memory_pool_limits, tf32=tf32)
    return NetworkFromOnnxPath(str(onnx_path), strongly_typed=True), config


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict, *, fp16: bool, refittable: bool, level: int,
                 timing_cache: Path, workspace_gib: float | None) -> Path:
    """Build one engine from ``onnx_path`` (FP32); with ``fp16``, from its FP16 copy, (re)written beside it first.
    Returns the ONNX the engine was built from.

    polygraphy 0.53.6 (the version NVIDIA ships with TensorRT 11.3) is safe on TensorRT 11 along this path: it
    sets ``EXPLICIT_BATCH`` only below TensorRT 10, a precision flag only when asked for one (none is), guards the
    calibrator and layer-precision calls that 11 removed, and reads engines through ``IStreamReaderV2``."""
    trt = require_tensorrt()
    # polygraphy and TensorRT only on a GPU install (sdtrt[gpu])
    from polygraphy.backend.trt import engine_bytes_from_network

    copy = fp16_onnx_path(onnx_path)
    if fp16:
        source = convert_to_fp16(onnx_path, copy)
    else:  # an FP16 copy left by an earlier FP16 build of this network (now --fp32) goes
        source = onnx_path
        for stale in (copy, copy.with_name(copy.name + ".data")):
            stale.unlink(missing_ok=True)
    limits = {trt.MemoryPoolType.WORKSPACE: int(workspace_gib * (1 << 30))} if workspace_gib else None
    network, config = engine_loaders(source, shapes, refittable=refittable, level=level, timing_cache=timing_cache,
                                     memory_pool_limits=limits, tf32=not fp16)
    engine = engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(engine_path, bytes(engine))  # a server loading the folder never reads half an engine
    return source


def build_engines(repo: str | Path, spec: ModelSpec, options: EngineOptions = EngineOptions(),
                  report: Callable[[str], None] = print, progress: bool = True) -> ModelSpec:
    """Build (or reuse) an engine per network of ``spec``'s model under ``repo``; returns the spec those engines
    serve (``served_spec``), with the engine manifest in it (``extra["engines"]``)."""
    if spec.hypertiles:  # (the same refusal as `sdtrt export --hypertile --engines`)
        raise UsageError(f"{spec.key} has Hypertile variants, which run on onnxruntime (their tiles are shapes "
                         "TensorRT would need as profile values): export it again without --hypertile for engines")
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
            report(f"{name}: building {'FP16' if fp16 else 'FP32'} engine for {gpu} (TensorRT {trt.__version__}"
                   f"{', from ' + fp16_onnx_path(Path(component.onnx)).name if fp16 else ''})")
            build_engine(root / component.onnx, path, shapes, fp16=fp16, refittable=options.refittable,
                         level=options.optimization_level, timing_cache=root / TIMING_CACHE,
                         workspace_gib=options.workspace_gib)
        manifest[name] = {"file": filename, "gpu": gpu, "tensorrt": trt.__version__, "fp16": fp16, "tf32": not fp16,
                          "fp16_conversion": FP16_CONVERSION if fp16 else None, "refittable": options.refittable,
                          "profile": {k: [list(s) for s in v] for k, v in shapes.items()}, "options": asdict(options)}
    return replace(spec, extra={**spec.extra, ENGINES: manifest})


def refit_engine(engine_path: Path, onnx_path: Path, out_path: Path, fp16: bool | None = None) -> None:
    """Swap new weights (same graph, e.g. a fused LoRA) into a refittable engine, written as a NEW file
    ``out_path``: the engine a server has loaded stays as it is until the server is told to load the new one.
    ``onnx_path`` is the re-exported FP32 ONNX; an FP16 engine (``fp16``; by default told by its weights' types) is
    refitted from its FP16 copy, written beside the engine (the same conversion as its build: same weight names,
    same types)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    with open(engine_path, "rb") as f:
        engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
    if engine is None or not engine.refittable:
        raise UsageError(f"{engine_path} is not a refittable engine: build it with --refittable")
    refitter = trt.Refitter(engine, logger)
    if fp16 is None:
        fp16 = any(refitter.get_weights_prototype(name).dtype == trt.DataType.HALF
                   for name in refitter.get_all_weights())
    source = convert_to_fp16(onnx_path, engine_path.parent / fp16_onnx_path(onnx_path).name) if fp16 else onnx_path
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(source)) or not refitter.refit_cuda_engine():
        raise SdtrtError(f"refitting {engine_path} from {source} failed: is it the same network?")
    write_atomic(out_path, bytes(engine.serialize()))


def refitted_filename(filename: str, weights_hash: str) -> str:
    """The file a refit writes: the engine's name with the new weights' hash (``unet....a1b2c3d4.w0123456789.plan``;
    the export key, which a fused LoRA changes too), so that refitting never rewrites the engine a running server
    holds."""
    stem = re.sub(r"\.w[0-9a-f]{10}$", "", filename.removesuffix(".plan"))
    return f"{stem}.w{weights_hash[:10]}.plan"


# --- the FP16 ONNX -----------------------------------------------------------------------------------------------
# sdtrt converts the graph itself, with onnx and numpy (already in [full]), and adds nothing to [gpu]:
#  * NVIDIA ModelOpt's AutoCast, what the TensorRT 11 migration guide recommends, cannot install beside onnx 1.17
#    (which protobuf < 5 for tritonclient 2.50 holds us to): every nvidia-modelopt[onnx] with AutoCast needs
#    onnx >= 1.18 (0.33) up to onnx ~= 1.21 (0.47), and 0.47 also onnxruntime-gpu ~= 1.24 and cupy-cuda12x.
#  * onnxconverter-common 1.16's float16 converter installs (protobuf >= 3.20.2, any onnx), but with keep_io_types
#    and the normalisations blocked it writes graphs that onnx.checker and onnxruntime reject for the default
#    model's U-Net, VAE decoder and text encoder (Identity, Cast and Where left typed FP32 beside FP16 inputs).
#  * exporting the torch modules in float16 (what TensorRT's demo/Diffusion does before its strongly typed
#    polygraphy builds, with FP16 inputs and outputs) would mean a second export of every network, FP32 wrappers
#    in the modules for the spec's FP32 inputs, outputs and normalisations, and a half-precision torch reference
#    on the CPU to check it against.
# What is FP16 follows diffusers' torch.float16 pipelines (what the GPU tests hold the engines to): everything,
# except what torch computes in FP32 there (its half normalisation kernels accumulate in FP32, the Timesteps
# sin/cos embedding is float32) and what must stay exact. The rules, in `_fp32_nodes`:
#  * normalisations (GroupNorm as InstanceNormalization, LayerNormalization): FP32 in, FP32 out, cast back after;
#    in FP16 their sums of squares overflow once activations pass 256 (256^2 is past FP16's 65504);
#  * sin/cos and the float tensors they are computed from (timestep x frequency: FP16 resolves t*f near 1000 only
#    to 0.5 rad);
#  * float arithmetic on shapes (an integer cast to float, e.g. the attention scale from the head size, sizes):
#    FP32, as integers past 2048 are not exact in FP16;
#  * ops whose float output type an attribute fixes, ops ONNX has no FP16 form of, loop bodies.
# The network's inputs and outputs keep their types (FP32 in the spec), through casts at the edges, so the Triton
# configs, the spec and the runners do not change. Constants are clamped to FP16's finite range (a -3.4e38 mask
# becomes -65504, as diffusers' FP16 CLIP masks with). The conversion is deterministic and depends on the graph
# only, never on the weights: the FP16 copy of a re-exported ONNX (refit) has the same weights, names and types.
FP16_CONVERSION = "sdtrt-fp16-1"  # change it whenever the rules change: engines built by the old ones are rebuilt
_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
_FP16_MAX = 65504.0
FP16_EXTERNAL_DATA_BYTES = 1 << 30  # weights past this go to a .data file beside the FP16 ONNX
NORMALIZATION_OPS = frozenset({"InstanceNormalization", "LayerNormalization", "GroupNormalization",
                               "BatchNormalization", "LpNormalization", "MeanVarianceNormalization",
                               "RMSNormalization", "SkipLayerNormalization"})
PERIODIC_OPS = frozenset({"Sin", "Cos"})
# Where the walk back from sin/cos stops: a weight layer's output is a network activation, not the timestep's.
_HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum"})
_FP32_OPS = frozenset({"Range", "NonMaxSuppression", "Celu",  # no float16 form in ONNX
                       "EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                       "Multinomial", "Bernoulli"})  # float output type set by an attribute
_LOOP_OPS = frozenset({"Loop", "Scan"})  # kept FP32 whole, bodies included
_ANY_TYPE_INPUTS = {"Cast": {0}, "CastLike": {0}, "Shape": {0}, "Size": {0}}  # take any type: never cast
_FP32_INPUTS = {"Resize": {2}, "Upsample": {1}}  # scales: tensor(float) whatever the data's type
_INTEGER_TYPES = frozenset({2, 3, 4, 5, 6, 7, 9, 12, 13})  # (u)int8..64 and bool: a cast from one starts shape math


def convert_to_fp16(src: Path, out: Path) -> Path:
    """Write ``out``: the FP16 copy of the ONNX network ``src`` (see the rules above); returns ``out``. Weights over
    FP16_EXTERNAL_DATA_BYTES in all go to one ``<out>.data`` file beside it (protobuf's limit is 2 GiB)."""
    model = onnx.load(str(src), load_external_data=False)
    types = _elem_types(onnx.shape_inference.infer_shapes(model))  # types only: the weights are not needed
    onnx.load_external_data_for_model(model, str(Path(src).parent))
    _Fp16Conversion(model, types).run()
    weights = []  # checked without its weights (types only), so that it fits protobuf's 2 GiB
    for init in (i for graph in _graphs(model.graph) for i in graph.initializer if i.HasField("raw_data")):
        weights.append((init, init.raw_data))
        init.ClearField("raw_data")
    try:  # a type the rules got wrong fails here, naming the node, not later in TensorRT's parser
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001 (onnx raises several kinds)
        raise SdtrtError(f"the FP16 copy of {src} is not a valid ONNX graph: {e}") from None
    finally:
        while weights:
            init, data = weights.pop()
            init.raw_data = data
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing external data file
    external = sum(i.ByteSize() for g in _graphs(model.graph) for i in g.initializer) > FP16_EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(out), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return out


def _graphs(graph):
    """``graph`` and every subgraph in it, outermost first."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _subgraphs(node) -> list:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else list(a.graphs))]


def _elem_types(model) -> dict[str, int]:
    """Every tensor's element type, subgraphs included (ONNX tensor names are unique across a model)."""
    types: dict[str, int] = {}
    for graph in _graphs(model.graph):
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.HasField("tensor_type"):
                types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
        for node in graph.node:
            if node.op_type == "Constant":
                types[node.output[0]] = _constant_type(node)
    return types


def _constant_type(node) -> int:
    attr = node.attribute[0]
    if attr.name == "value":
        return attr.t.data_type
    return _FLOAT if attr.name in ("value_float", "value_floats") else 0


def _fp16_tensor(tensor, name: str | None = None):
    array = np.clip(numpy_helper.to_array(tensor), -_FP16_MAX, _FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(array, tensor.name if name is None else name)


class _Fp16Conversion:
    """One pass over the model, in place: decide which nodes stay FP32, then retype every FLOAT tensor (FP16 unless
    its producer stays FP32), with a Cast wherever a consumer wants the other type."""

    def __init__(self, model, types: dict[str, int]):
        self.model, self.types = model, types
        self.new_types: dict[str, int] = {}  # FLOAT tensors' types after the conversion
        self.fp32: set[str] = set()  # the names of the nodes kept in FP32
        self.wants: dict[str, list[int | None]] = {}  # tensor -> the type each consumer wants (None: any)

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == _FLOAT

    def run(self) -> None:
        graph = self.model.graph
        _name_nodes(graph)
        self.fp32 = _fp32_nodes(graph, self.types)
        self._collect_wants(graph, forced=False)
        for output in graph.output:  # the network's outputs keep their types
            self.wants.setdefault(output.name, []).append(_FLOAT)
        for tensor in graph.input:
            if self.is_float(tensor.name):
                self.new_types[tensor.name] = _FLOAT
        self._convert(graph, scope="", forced=False)
        self._restore_output_types(graph)

    def _node_type(self, node, forced: bool) -> int:
        return _FLOAT if forced or node.name in self.fp32 else _FLOAT16

    def _collect_wants(self, graph, forced: bool) -> None:
        for node in graph.node:
            own = self._node_type(node, forced)
            for i, name in enumerate(node.input):
                if not name:
                    continue
                if i in _ANY_TYPE_INPUTS.get(node.op_type, ()):
                    want = None
                elif i in _FP32_INPUTS.get(node.op_type, ()):
                    want = _FLOAT
                else:
                    want = own
                self.wants.setdefault(name, []).append(want)
            for sub in _subgraphs(node):
                inner = forced or node.op_type in _LOOP_OPS
                self._collect_wants(sub, inner)
                for output in sub.output:  # a branch's outputs are the node's
                    self.wants.setdefault(output.name, []).append(_FLOAT if inner else own)

    def _constant_as_fp16(self, name: str) -> bool:
        """A float constant (initializer, Constant) becomes FP16 when an FP16 consumer reads it; one read only by
        FP32 consumers, or by ops of any type (Shape, Cast: often a shape in float), stays FP32."""
        return _FLOAT16 in self.wants.get(name, [])

    def _convert(self, graph, scope: str, forced: bool) -> None:
        casts: dict[tuple[str, int], str] = {}  # (tensor, type) -> its cast, in this graph
        nodes = []

        def typed(name: str, want: int) -> str:
            if self.new_types[name] == want:
                return name
            if (name, want) not in casts:
                cast = f"{scope}{name}_to_{'fp16' if want == _FLOAT16 else 'fp32'}"
                nodes.append(helper.make_node("Cast", [name], [cast], name=f"{cast}_Cast", to=want))
                casts[name, want] = cast
            return casts[name, want]

        for i, init in enumerate(graph.initializer):
            if init.data_type == _FLOAT:
                fp16 = self._constant_as_fp16(init.name)
                if fp16:
                    graph.initializer[i].CopyFrom(_fp16_tensor(init))
                self.new_types[init.name] = _FLOAT16 if fp16 else _FLOAT
        for tensor in graph.input if scope else ():  # a loop body's own inputs (FP32: the loop is)
            if self.is_float(tensor.name):
                self.new_types[tensor.name] = _FLOAT
        for node in graph.node:
            own = self._node_type(node, forced)
            if node.op_type == "Constant":
                if self.is_float(node.output[0]):
                    fp16 = self._constant_as_fp16(node.output[0])
                    if fp16:
                        value = node.attribute[0]
                        tensor = value.t if value.name == "value" else helper.make_tensor(
                            "", _FLOAT, [] if value.name == "value_float" else [len(value.floats)],
                            [value.f] if value.name == "value_float" else list(value.floats))
                        del node.attribute[:]
                        node.attribute.append(helper.make_attribute("value", _fp16_tensor(tensor, "")))
                    self.new_types[node.output[0]] = _FLOAT16 if fp16 else _FLOAT
                nodes.append(node)
                continue
            for i, name in enumerate(node.input):
                if not self.is_float(name) or i in _ANY_TYPE_INPUTS.get(node.op_type, ()):
                    continue
                node.input[i] = typed(name, _FLOAT if i in _FP32_INPUTS.get(node.op_type, ()) else own)
            for attr in node.attribute:
                if attr.name == "to" and node.op_type == "Cast" and attr.i == _FLOAT:
                    attr.i = own
                elif attr.name == "value" and node.op_type == "ConstantOfShape" and attr.t.data_type == _FLOAT \
                        and own == _FLOAT16:
                    attr.t.CopyFrom(_fp16_tensor(attr.t))
            if node.op_type == "ConstantOfShape" and not node.attribute and own == _FLOAT16:  # default: FP32 zeros
                node.attribute.append(helper.make_attribute("value", helper.make_tensor("", _FLOAT16, [1], [0.0])))
            inner = forced or node.op_type in _LOOP_OPS
            for n, sub in enumerate(_subgraphs(node)):
                self._convert(sub, f"{scope}{node.name or node.op_type}/{n}/", inner)
                self._type_branch_outputs(sub, _FLOAT if inner else own, f"{scope}{node.name or node.op_type}/{n}/")
            for name in node.output:
                if self.is_float(name):
                    self.new_types[name] = own
            nodes.append(node)
        del graph.value_info[:]  # the old FP32 annotations: TensorRT and onnxruntime infer the new ones
        del graph.node[:]
        graph.node.extend(nodes)

    def _type_branch_outputs(self, sub, want: int, scope: str) -> None:
        for output in sub.output:
            if not self.is_float(output.name):
                continue
            if self.new_types[output.name] != want:
                cast = f"{scope}{output.name}_out"
                sub.node.append(helper.make_node("Cast", [output.name], [cast], name=f"{cast}_Cast", to=want))
                self.types[cast], self.new_types[cast] = _FLOAT, want
                output.name = cast
            output.type.tensor_type.elem_type = want

    def _restore_output_types(self, graph) -> None:
        """An output computed in FP16 is renamed inside the graph and cast back to FP32 under its own name."""
        for output in graph.output:
            if not self.is_float(output.name) or self.new_types[output.name] == _FLOAT:
                continue
            inner = f"{output.name}_fp16"
            for g in _graphs(graph):
                for node in g.node:
                    node.input[:] = [inner if x == output.name else x for x in node.input]
                    node.output[:] = [inner if x == output.name else x for x in node.output]
                for init in g.initializer:
                    if init.name == output.name:
                        init.name = inner
                for sub_output in g.output if g is not graph else ():
                    if sub_output.name == output.name:
                        sub_output.name = inner
            graph.node.append(helper.make_node("Cast", [inner], [output.name], name=f"{output.name}_Cast",
                                               to=_FLOAT))


def _name_nodes(graph) -> None:
    """Give every node a unique name (the exporter's are; a nameless or repeated one gets one), so that nodes can
    be told apart by name (protobuf's Python objects for them come and go)."""
    seen: set[str] = set()
    for g in _graphs(graph):
        for node in g.node:
            if not node.name or node.name in seen:
                node.name = f"{node.op_type}_fp16conv_{len(seen)}"
            seen.add(node.name)


def _fp32_nodes(graph, types: dict[str, int]) -> set[str]:
    """The names of the nodes that stay FP32, by the rules above (subgraph nodes included)."""
    fp32: set[str] = set()
    producers: dict[str, object] = {}
    ordered = []

    def visit(g) -> None:
        for node in g.node:
            ordered.append(node)
            for name in node.output:
                producers[name] = node
            for sub in _subgraphs(node):
                visit(sub)

    visit(graph)

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == _FLOAT

    constants = {i.name for g in _graphs(graph) for i in g.initializer}
    constants |= {n.output[0] for n in ordered if n.op_type == "Constant"}
    shape_math: set[str] = set()  # float tensors computed from integers (shapes) alone
    for node in ordered:  # in topological order, so one pass follows every chain
        floats_in = [x for x in node.input if is_float(x)]
        if node.op_type in NORMALIZATION_OPS or node.op_type in _FP32_OPS or node.op_type in _LOOP_OPS:
            fp32.add(node.name)
        elif node.op_type == "Cast" and types.get(node.input[0]) in _INTEGER_TYPES and is_float(node.output[0]):
            fp32.add(node.name)  # an integer (or bool) becomes a float: shape arithmetic starts here
            shape_math.update(node.output)
        elif any(x in shape_math for x in floats_in) and all(x in shape_math or x in constants for x in floats_in) \
                and not _subgraphs(node):
            fp32.add(node.name)
            shape_math.update(x for x in node.output if is_float(x))
    walked: set[str] = set()
    stack = [node for node in ordered if node.op_type in PERIODIC_OPS]  # sin/cos and the float chain feeding them
    while stack:
        current = stack.pop()
        if current.name in walked:
            continue
        walked.add(current.name)
        fp32.add(current.name)
        for name in current.input:
            producer = producers.get(name)
            if is_float(name) and producer is not None and producer.op_type not in _HEAVY_OPS \
                    and not _subgraphs(producer):
                stack.append(producer)
    return fp32
