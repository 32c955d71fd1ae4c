"""config.pbtxt generation: every Triton config is derived from the spec, never kept by hand.

One generator, three backends for the networks (text encoder, U-Net, VAE encoder and decoder):
  * ``python``      - a CPU engine inside a Python-backend model (runs anywhere, incl. the pip tritonserver):
                      onnxruntime (fp32), or OpenVINO in fp32 or bf16 (``cpu_engine``, ``cpu_precision``)
  * ``onnxruntime`` - ``platform: "onnxruntime_onnx"`` (NVIDIA's Triton server image)
  * ``tensorrt``    - ``platform: "tensorrt_plan"`` (GPU, engines built by ``sdtrt export --format trt``)
The tokenizer and the jobs users call (``txt2img``, ``img2img``) are Python-backend models. A job model runs the
pipeline's stages in order through BLS (tokenizer -> text encoder -> its denoising loop on the U-Net -> VAE
decoder): it holds the client's own request, so a client that cancels or disconnects stops its loop at the
next step (Triton cancels only the request the client sent; an ensemble's step already running never hears).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import (
    ENGINES,
    IMAGES,
    IMG2IMG,
    INFOTEXTS,
    INIT_IMAGE,
    FIRSTPASS_IMAGE,
    LATENT_MASK,
    MASK,
    MODEL,
    PROGRESS,
    PROGRESS_PREVIEW,
    PROGRESS_REQUEST_ID,
    PROGRESS_STEP,
    PROGRESS_TOTAL,
    SEEDS,
    SPEC_PARAMETER,
    TXT2IMG,
    WIRE_DTYPES,
    SERVED_CPU_ENGINES,
    CPU_PRECISIONS,
    MAX_CONTROLNET_UNITS,
    Catalog,
    ComponentSpec,
    ModelSpec,
    TensorSpec,
    controlnet_image,
    controlnet_mask,
)
from sdtrt.requests.extra_networks import EMBEDDING_VECTORS
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest, job_fields

NETWORK_BACKENDS = ("python", "onnxruntime", "tensorrt")
NETWORKS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")  # and, with registered LoRAs, *_lora variants


def config_dtype(dtype: str) -> int:
    """Spec dtype -> model-config data type (TYPE_STRING is what the wire calls BYTES)."""
    return mc.TYPE_STRING if dtype == "string" else getattr(mc, "TYPE_" + WIRE_DTYPES[dtype])


@dataclass(frozen=True)
class ServingOptions:
    backend: str = "python"
    scheduler_instances: int = 4  # denoising loops a job runs at once; their U-Net calls are batched together
    # Requests a job model holds beyond its running loops (plus the one its instance holds while it waits for a
    # loop); more get UNAVAILABLE (busy, retry).
    max_queue: int = 16
    # How long the U-Net batcher waits for more requests' steps. 0: a lone request never waits, and steps that
    # queue while the U-Net runs are still merged into its next call (benchmarks/batching_bench.py: on 2 cores,
    # 0 us gives lower latency AND higher 4-client throughput than 2000 us, with the same 2 requests per call).
    unet_queue_delay_us: int = 0
    network_instances: int = 1
    # The python backend's CPU engine (sdtrt.pipeline.runners): onnxruntime computes as diffusers does (fp32); OpenVINO
    # fp32 computes the same, faster on some CPUs and not on others; bf16 about 2x faster where the CPU has bfloat16
    # (benchmarks/cpu_bench.py). "auto" (the CLI's default) measures them per network at its first start. The
    # library's default stays onnxruntime, the reference the tests hold pictures to.
    cpu_engine: str = "onnxruntime"
    cpu_precision: str = "fp32"
    # Triton's onnxruntime backend on the GPUs (its CUDA execution provider) instead of the CPU: `sdtrt serve` sets it
    # where a GPU is visible (--device auto).
    gpu: bool = False
    # Where a loop's per-step networks (U-Net, ControlNets) run: "bls" (calls to their Triton models) or
    # "in_process" (in the job model's own process, no round trip per step; python backend only, and each job
    # instance holds its own copy: model_repository/models/loop_networks.py)
    loop_networks: str = "bls"

    def __post_init__(self):
        if self.backend not in NETWORK_BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(NETWORK_BACKENDS)}, got {self.backend!r}")
        if self.cpu_engine not in SERVED_CPU_ENGINES or self.cpu_precision not in CPU_PRECISIONS:
            raise UsageError(f"the CPU engine must be one of {', '.join(SERVED_CPU_ENGINES)} and its precision one of "
                             f"{', '.join(CPU_PRECISIONS)}, got {self.cpu_engine} {self.cpu_precision}")
        if self.cpu_engine == "onnxruntime" and self.cpu_precision != "fp32":
            raise UsageError(f"onnxruntime runs fp32 only: {self.cpu_precision} needs --cpu-engine openvino")
        if self.loop_networks not in LOOP_NETWORKS:
            raise UsageError(f"loop_networks must be one of {', '.join(LOOP_NETWORKS)}, got {self.loop_networks!r}")
        if self.loop_networks == IN_PROCESS and self.backend != "python":
            raise UsageError("in-process loop networks run the python backend's CPU engines: they need --backend "
                             f"python, not {self.backend}")
        if self.gpu and self.backend == "python":
            raise UsageError("the python backend runs its networks on the CPU: --device gpu needs --backend onnxruntime "
                             "(Triton's, CUDA) or tensorrt (build-engines)")


LOOPS_PARAMETER = "loops"  # the job models' config parameter: scheduler_instances
LOOP_NETWORKS_PARAMETER = "loop_networks"  # theirs too: ServingOptions.loop_networks (with engine, precision)
IN_PROCESS = "in_process"
LOOP_NETWORKS = ("bls", IN_PROCESS)

# The tokenizer's outputs, named once here for the tokenizer model and the job models that call it.
TOKEN_IDS = "token_ids"  # [2k, 77]: the negative prompt's k chunks, then the prompt's k chunks
TOKEN_WEIGHTS = "token_weights"  # [2k, 77]: A1111 attention weights of those tokens
CLIP_SKIP_ROWS = "clip_skip_rows"  # [2k, 1]: the request's Clip skip, one per text-encoder row
# The tokenizer's inputs: one text pair of a plan (sdtrt.requests.plan.TextPair), already parsed, as weighted pieces
PIECE_TEXTS = "piece_texts"  # [P] string: the negative prompt's pieces, then the prompt's
PIECE_WEIGHTS = "piece_weights"  # [P] float32: each piece's A1111 weight (BREAK: "BREAK" at -1)
NEGATIVE_PIECES = "negative_pieces"  # [1] int32: how many of the pieces are the negative prompt's



def _tensor(message, name: str, dtype: str, dims: list[int]) -> None:
    t = message.add()
    t.name = name
    t.data_type = config_dtype(dtype)
    t.dims.extend(dims)


def _dims(tensor: TensorSpec, batched: bool, pinned: dict[str, int] | None = None) -> list[int]:
    """Config dims of a spec tensor: fixed sizes, pinned dynamic dims at their value, the rest -1."""
    pinned = pinned or {}
    shape = [d if isinstance(d, int) else pinned.get(d, -1) for d in tensor.shape]
    return shape[1:] if batched else shape


@dataclass(frozen=True)
class Batching:
    """How a network takes batches: Triton's max_batch_size (0: the request's first dim is the engine's own,
    fixed) and the dynamic dims a built engine fixes (name -> size)."""

    max_batch_size: int
    pinned: dict[str, int]


def leads_with_batch(component: ComponentSpec) -> bool:
    """Whether every input of a network leads with the same dim, one Triton can gather rows along."""
    return len({t.shape[0] for t in component.inputs}) == 1


def engine_batching(spec: ModelSpec, component: ComponentSpec, profile: dict[str, list[list[int]]]) -> Batching:
    """Read from a TensorRT engine's optimisation profile (``{input: [min, opt, max] shapes}``, as the engine
    manifest records it): a dim is pinned where min == max. The batch limit is what Triton's TensorRT backend
    computes from the same profile, the smallest max first dim over the inputs; an engine whose batch dim is
    pinned takes only that many rows, so Triton must not batch for it (max_batch_size 0, full dims)."""
    pinned: dict[str, int] = {}
    for tensor in component.inputs:
        lo, _, hi = profile[tensor.name]
        pinned.update({d: lo[i] for i, d in enumerate(tensor.shape) if isinstance(d, str) and lo[i] == hi[i]})
    batch_dim = component.inputs[0].shape[0]
    if batch_dim in pinned or not leads_with_batch(component):
        return Batching(0, pinned)
    return Batching(min(profile[t.name][2][0] for t in component.inputs), pinned)


def engine_entry(spec: ModelSpec, component: ComponentSpec) -> dict:
    """The TensorRT engine of a network, as the spec's engine manifest records it (``sdtrt.export.tensorrt``)."""
    engines = spec.extra.get(ENGINES, {})
    if component.name not in engines:
        raise UsageError(f"model {spec.key!r} has no TensorRT engine for {component.name}: build them with "
                         f"`sdtrt build-engines REPO_DIR --model {spec.key}` (or export it with --format trt)")
    return engines[component.name]


def network_batching(spec: ModelSpec, component: ComponentSpec, options: ServingOptions) -> Batching:
    """onnxruntime takes the spec's whole batch range; a TensorRT engine what its profile was built for. A network
    whose inputs lead with different dims (BLIP's decoder: a caption's beams, and the one picture's tokens they all
    read) has no batch Triton could gather rows of: it takes full shapes (max_batch_size 0)."""
    if options.backend == "tensorrt":
        return engine_batching(spec, component, engine_entry(spec, component)["profile"])
    if not leads_with_batch(component):
        return Batching(0, {})
    return Batching(spec.dims[component.inputs[0].shape[0]].max, {})


def network_config(spec: ModelSpec, component: ComponentSpec, options: ServingOptions) -> mc.ModelConfig:
    """A network with an implicit batch dim (the spec's first dim) and dynamic batching where requests can
    share a call; a fixed-batch TensorRT engine gets full shapes and takes requests only as they are."""
    batching = network_batching(spec, component, options)
    batched = batching.max_batch_size > 0
    config = mc.ModelConfig(name=spec.triton_name(component.name), max_batch_size=batching.max_batch_size)
    if options.backend == "python":
        config.backend = "python"
    elif options.backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
    elif options.backend == "tensorrt":
        config.platform = "tensorrt_plan"
        config.default_model_filename = engine_entry(spec, component)["file"]  # never a stale model.plan
    else:
        raise ValueError(f"backend must be one of {NETWORK_BACKENDS}, got {options.backend!r}")
    for spec_list, message in ((component.inputs, config.input), (component.outputs, config.output)):
        for tensor in spec_list:
            dims = _dims(tensor, batched, batching.pinned)
            if len(tensor.shape) == 1:
                # A per-row scalar (the U-Net timestep) travels as [rows, 1]; the network sees [rows].
                _tensor(message, tensor.name, tensor.dtype, dims + [1])
                message[-1].reshape.SetInParent()
                message[-1].reshape.shape.extend(dims)
            else:
                _tensor(message, tensor.name, tensor.dtype, dims)
    if batching.max_batch_size > 1:  # two requests can share a call
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.max_queue_delay_microseconds = (
            options.unet_queue_delay_us if component.name.startswith("unet") else 0
        )
    config.instance_group.add(count=options.network_instances, kind=device_kind(options))
    if options.backend == "python":
        config.parameters["onnx_file"].string_value = "model.onnx"
        config.parameters["engine"].string_value = options.cpu_engine
        config.parameters["precision"].string_value = options.cpu_precision
    return config


def device_kind(options: ServingOptions) -> int:
    """TensorRT engines, onnxruntime's networks on a GPU server, and the loops that feed them run on the GPU;
    everything else on the CPU (the python backend's engines are CPU engines)."""
    on_gpu = options.backend == "tensorrt" or (options.backend == "onnxruntime" and options.gpu)
    return mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU


def progress_config() -> mc.ModelConfig:
    """``progress``: with ``step`` and ``total`` it records a request's progress, without them it answers it."""
    config = mc.ModelConfig(name=PROGRESS, backend="python", max_batch_size=0)
    _tensor(config.input, PROGRESS_REQUEST_ID, "string", [1])
    for name in (PROGRESS_STEP, PROGRESS_TOTAL):
        _tensor(config.input, name, "int32", [1])
        config.input[-1].optional = True
        _tensor(config.output, name, "int32", [1])
    _tensor(config.input, PROGRESS_PREVIEW, "uint8", [-1, -1, 3])
    config.input[-1].optional = True
    _tensor(config.output, PROGRESS_PREVIEW, "uint8", [-1, -1, 3])
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    return config


# Request fields the tokenizer takes (beside a text pair's pieces).
TOKENIZER = "tokenizer"
TOKENIZER_FIELDS = ("clip_skip", "sdxl_clip_l_skip", "comma_padding_backtrack")


@dataclass(frozen=True)
class Job:
    name: str  # the model users call
    request_type: type  # its fields (every one an optional [1]-shaped input)
    pictures: tuple[str, ...] = ()  # the uint8 pictures it takes beside them (the plan prepares them)


JOBS = {job.name: job for job in (Job(TXT2IMG, Txt2ImgRequest, (FIRSTPASS_IMAGE,)),
                                  Job(IMG2IMG, Img2ImgRequest, (INIT_IMAGE, MASK, LATENT_MASK)))}
PICTURE_DIMS = {INIT_IMAGE: [-1, -1, 3], FIRSTPASS_IMAGE: [-1, -1, 3], MASK: [-1, -1], LATENT_MASK: [-1, -1]}
# Every job's ControlNet units' pictures and masks (sdtrt.requests.controlnet): optional, one of each per unit
CONTROL_PICTURES = tuple(name for unit in range(MAX_CONTROLNET_UNITS)
                         for name in (controlnet_image(unit), controlnet_mask(unit)))
PICTURE_DIMS.update({name: [-1, -1, 3] if name.startswith("controlnet_image") else [-1, -1] for name in CONTROL_PICTURES})


def tokenizer_config(spec: ModelSpec) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.triton_name(TOKENIZER), backend="python", max_batch_size=0)
    _tensor(config.input, PIECE_TEXTS, "string", [-1])
    _tensor(config.input, PIECE_WEIGHTS, "float32", [-1])
    _tensor(config.input, NEGATIVE_PIECES, "int32", [1])
    for name in TOKENIZER_FIELDS:
        _tensor(config.input, name, spec.field(name).dtype, [1])
        config.input[-1].optional = True
    _tensor(config.output, TOKEN_IDS, "int32", [-1, spec.text_max_length])
    _tensor(config.output, TOKEN_WEIGHTS, "float32", [-1, spec.text_max_length])
    _tensor(config.output, CLIP_SKIP_ROWS, "int32", [-1, 1])
    _tensor(config.output, EMBEDDING_VECTORS, "float32", [-1, spec.text_max_length, spec.text_hidden_size])
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    return config


def job_config(catalog: Catalog, job: Job, options: ServingOptions) -> mc.ModelConfig:
    """A model users call, for every model of the repository: ``model`` names one (absent: the default), every
    request field is an optional [1] input (absent: that model's default; an empty prompt is valid, as in
    A1111), img2img's pictures, and the pictures and seeds out."""
    spec = catalog.get()
    config = mc.ModelConfig(name=job.name, backend="python", max_batch_size=0)
    _tensor(config.input, MODEL, "string", [1])
    config.input[-1].optional = True
    for name in job_fields(job.request_type):
        _tensor(config.input, name, spec.field(name).dtype, [1])
        config.input[-1].optional = True
    for picture in job.pictures + CONTROL_PICTURES:
        _tensor(config.input, picture, "uint8", PICTURE_DIMS[picture])
        config.input[-1].optional = True  # checked by the model, which names it (Triton's own message would not)
    channels = spec.component("vae_decoder").outputs[0].shape[1]
    _tensor(config.output, IMAGES, "uint8", [-1, -1, -1, channels])
    _tensor(config.output, SEEDS, "int64", [-1])
    _tensor(config.output, INFOTEXTS, "string", [-1])
    if job.name == TXT2IMG:  # clients read the specs from here (the same JSON export wrote)
        config.parameters[SPEC_PARAMETER].string_value = json.dumps(catalog.to_json(), separators=(",", ":"))
    # One instance runs the job's loops in threads (model_repository/models/job_model.py, JobModel); on a GPU it is a
    # GPU instance (one per GPU) and the latents stay on the device between U-Net calls.
    config.instance_group.add(count=1, kind=device_kind(options))
    config.parameters[LOOPS_PARAMETER].string_value = str(options.scheduler_instances)
    config.parameters[LOOP_NETWORKS_PARAMETER].string_value = options.loop_networks
    if options.loop_networks == IN_PROCESS:  # the engine the network models run, for the same choice here
        config.parameters["engine"].string_value = options.cpu_engine
        config.parameters["precision"].string_value = options.cpu_precision
    # One request per execution (max_batch_size 0); the batcher is here for its queue policy: requests wait while
    # every loop is busy, a bounded number of them, then Triton's UNAVAILABLE ("Exceeds maximum queue size",
    # HTTP 503) instead of an ever longer queue.
    config.dynamic_batching.default_queue_policy.max_queue_size = options.max_queue
    return config


def model_configs(spec: ModelSpec, options: ServingOptions) -> list[mc.ModelConfig]:
    """One model's own Triton models: its tokenizer and its networks."""
    return [tokenizer_config(spec), *(network_config(spec, component, options) for component in spec.components.values())]


def all_configs(catalog: Catalog, options: ServingOptions) -> list[mc.ModelConfig]:
    configs = [config for spec in catalog.models.values() for config in model_configs(spec, options)]
    configs += [job_config(catalog, job, options) for job in JOBS.values()] + [progress_config()]
    for config in configs:
        if config.backend == "python":
            # The Python models read their inputs with as_numpy(): their inputs must arrive in CPU memory, whoever
            # produced them (a TensorRT network answers in GPU memory). The backend's default, stated.
            config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "yes"
    return configs


GENERATED_HEADER = "# Generated by `sdtrt export` from sdtrt_spec.json; edit the spec or the generator, not this file.\n"


def to_pbtxt(config: mc.ModelConfig) -> str:
    return GENERATED_HEADER + text_format.MessageToString(config)
