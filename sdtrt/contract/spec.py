"""The model spec: the one file that records every fact about an exported model.

`sdtrt export` writes it (``sdtrt_spec.json`` at the root of the model repository) and every
later reader -- the reference runner, the Triton config generator, the server models, the client
and the tests -- loads it with :func:`load_spec` instead of restating tensor names, shapes, dtypes,
latent geometry or request limits.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from sdtrt.contract.errors import InvalidRequest, UsageError
from sdtrt.contract.files import write_atomic

SPEC_FILENAME = "sdtrt_spec.json"  # at a repository's root: every model's spec, and which one is the default
SPEC_VERSION = 24  # 2: per-request ceilings, the sampler x schedule table; 3: several models per repository;
# 4: LoRAs and embeddings per request (the text encoder takes embedding vectors); 5: randn_source (A1111's NV noise), seed_resize_from_w/h;
# 6: every A1111 schedule type in the sampler x schedule table, the family's Align Your Steps levels; inpainting_fill;
# 7: guidance_rescale (diffusers' CFG rescale)
# 8: a request read once into a plan: the tokenizer takes a text's weighted pieces, the jobs return the infotexts
# 9: A1111's sampler settings (eta, sigma churn, s_noise, NGMS, ENSD) and k_diffusion; k-diffusion-only samplers
# 10: tiling (A1111's seamless Tiling: the U-Net's and VAE's tiling variants, exported with --tiling)
# 11: DDIM CFG++ and A1111's own timestep samplers (DDIM, PLMS) in the A1111-exact mode; the refiner and hires
# checkpoint; pad_conds; mask_round and img2img's latent_mask input
# 12: soft inpainting, img2img_fix_steps, skip_early_cond and s_min_uncond_all; UniPC on A1111's timesteps
# 13: A1111's schedule options (sigma range, rho, Beta's alpha and beta, ...), noise levels and extra noise
# 14: emphasis, pad_conds_v0, refiner_switch_by_steps, hires_refiner_pass
# 15: VAEs registered at export (vaes, their encoder and decoder networks) and the request's vae
# 16: sdxl_clip_l_skip (SDXL's text encoder reads a negative Clip skip as A1111's CLIP-L-only skip)
# 17: upscaler models registered at export (upscalers, their networks and dims), hr_upscaler's choices per model
# 18: A1111's UniPC options (unipc_variant, unipc_skip_type, unipc_order, unipc_lower_order_final)
# 19: sdxl_crop_top and sdxl_crop_left (SDXL's time ids)
# 20: comma_padding_backtrack (the tokenizer takes it)
# 21: face restoration (face_restorers, the face detector, parser and restorer networks; restore_faces, face_restorer,
# code_former_weight)
# 22: SwinIR and DAT upscalers (an upscaler's tiling; the single dim, face_batch before; swinir_tile, dat_tile, ...);
# Hypertile (the _hypertile variants, their layers in the extra; the hypertile_* fields); interrogators (DeepBooru)
# 23: the CLIP interrogator (BLIP and CLIP networks, the caption and CLIP-text dims); export/networks/ (module paths)
# 24: ControlNet (controlnets, their networks, the U-Net's residual inputs and their scaled latent dims;
# controlnet_units and the units' pictures)

# A1111's "Tiling" pads every convolution of the U-Net and the VAE circularly, so the picture wraps at its edges:
# an export with --tiling adds these networks' variants, named <network><TILING_SUFFIX>, which a tiling request runs.
TILING_NETWORKS = ("unet", "vae_decoder", "vae_encoder")
TILING_SUFFIX = "_tiling"
# A1111's Hypertile: an export with --hypertile adds these networks' variants, named <network><HYPERTILE_SUFFIX>,
# which take the tiles of their Hypertile layers as one more input (ModelSpec.extra[HYPERTILE]: the U-Net's layers).
HYPERTILE_NETWORKS = ("unet", "vae_decoder")
HYPERTILE_SUFFIX = "_hypertile"
HYPERTILE_INPUT = "hypertile"
# ... its numbers a layer (sdtrt.requests.hypertile draws them): the U-Net's tiles down, across and A1111's first
# side of the layer's tokens; the VAE decoder's tiles down and across
HYPERTILE_NUMBERS = {"unet": 3, "vae_decoder": 2}
HYPERTILE = "hypertile"
# A1111's "SD VAE": an export with --vaes DIR adds each VAE's encoder and decoder, named <network>_vae_<its slug>,
# which a request naming that VAE runs (ModelSpec.vaes: name -> file, hashes, slug).
VAE_NETWORKS = ("vae_decoder", "vae_encoder")
# A1111's names for "the checkpoint's own VAE" (its sd_vae option), which run the export's VAE
OWN_VAE_NAMES = ("", "Automatic", "None")


def vae_component(network: str, slug: str) -> str:
    return f"{network}_vae_{slug}"


# Upscaler models (A1111's models/ESRGAN, ...): an export with --upscalers DIR adds each as a network named
# upscaler_<its slug>, a batch of picture tiles in, the tiles at the model's scale out (ModelSpec.upscalers: name
# -> file, hashes, scale, architecture, slug).
def upscaler_component(slug: str) -> str:
    return f"upscaler_{slug}"


# Face restoration (A1111's models/GFPGAN, models/Codeformer): an export with --face-restorers DIR adds facexlib's
# face detector and face parser (the files A1111's face helper runs) and each restorer, named
# face_restorer_<its slug> (ModelSpec.face_restorers: A1111's name, GFPGAN or CodeFormer -> file, hashes, slug).
FACE_DETECTOR = "face_detector"
FACE_PARSER = "face_parser"
FACE_SIZE = 512  # the aligned face crop the parser and restorers take, as A1111's face helper cuts it
# The sides of the picture the detector takes: A1111 gives it a short side of 640 (a little under, by rounding),
# so the long side is 640 times the picture's aspect ratio, up to 1:6.4 here
FACE_DETECT_SIDES = (256, 4096)
FACE_DETECT_SHORT_SIDE = 640  # A1111's get_face_landmarks_5(resize=640)


def interrogator_component(name: str) -> str:
    """An interrogator's network (A1111's /interrogate models: deepdanbooru), registered with --interrogators DIR."""
    return f"interrogator_{name}"


# A1111's CLIP interrogator (/interrogate's "clip"): BLIP captions the picture, CLIP ranks category lines against it.
# Its four networks (interrogator_component of each): BLIP's ViT, BLIP's text decoder (the next token's logits),
# CLIP's image features and CLIP's text features (of the export's category lines, by row: their tokens are in it).
CLIP_INTERROGATOR = "clip"
BLIP_VISION, BLIP_DECODER, CLIP_IMAGE, CLIP_TEXT = "blip_vision", "blip_decoder", "clip_image", "clip_text"
# A1111's limits for BLIP's caption (its interrogate_clip_* sliders): beams, and the caption's length in tokens
CAPTION_BEAMS = (1, 16)
CAPTION_LENGTH = (1, 256)
CLIP_TEXTS_A_CALL = 128


def face_restorer_component(slug: str) -> str:
    return f"face_restorer_{slug}"


# ControlNet (A1111's sd-webui-controlnet): an export with --controlnets DIR adds each ControlNet as a network named
# controlnet_<its slug> (ModelSpec.controlnets: A1111's model name -> file, hashes, slug). It takes the U-Net's
# inputs, the unit's control picture (CONTROL_HINT, [rows, 3, H, W] in [0, 1]) and a scale per row and residual
# (CONTROL_SCALES: the unit's weight, control mode and guidance folded in), and gives the residuals the U-Net adds to
# its skip connections and its middle block. With ControlNets every U-Net variant takes those residuals as inputs
# (zeros when no unit is active at a step), so that one U-Net serves requests with and without units.
def controlnet_component(slug: str) -> str:
    return f"controlnet_{slug}"


CONTROL_HINT = "controlnet_cond"
CONTROL_SCALES = "control_scales"
MID_RESIDUAL = "mid_block_residual"


def down_residual(index: int) -> str:
    return f"down_block_residual_{index}"


def is_residual(name: str) -> bool:
    """Whether a U-Net input is a ControlNet residual."""
    return name == MID_RESIDUAL or name.startswith("down_block_residual_")


def controlnet_image(unit: int) -> str:
    """The job input carrying the ``unit``-th ControlNet unit's picture ([H, W, 3] uint8)."""
    return f"controlnet_image_{unit}"


def controlnet_mask(unit: int) -> str:
    """... and its mask ([H, W] uint8, white = the area the unit's inpaint preprocessors repaint)."""
    return f"controlnet_mask_{unit}"


MAX_CONTROLNET_UNITS = 3  # A1111's control_net_unit_count default: the units one request may enable


def scaled_dim(dim: str, factor: int) -> str:
    """A dim ``factor`` times smaller than ``dim``, rounded up (a stride-2 convolution's output, repeated): the
    U-Net's lower levels, where the ControlNet residuals of those levels live."""
    return f"{dim}/{factor}"


def dim_factor(name: str) -> tuple[str, int]:
    """(the dim a scaled dim follows, its factor); (name, 1) for a dim of its own."""
    base, _, factor = name.partition("/")
    return base, int(factor) if factor else 1


def scaled_range(base: "DimRange", factor: int) -> "DimRange":
    return DimRange(-(-base.min // factor), -(-base.opt // factor), -(-base.max // factor))

# Spec dtypes (numpy names, plus "string") -> Triton wire datatypes. Configs, clients and tests all map through this.
WIRE_DTYPES = {"string": "BYTES", "bool": "BOOL", "uint8": "UINT8", "int32": "INT32", "int64": "INT64",
               "float16": "FP16", "float32": "FP32"}

# Names of the dynamic dimensions (their ranges are ModelSpec.dims; export/networks/descriptors.py uses them in shapes).
BATCH = "batch"  # images in a request (VAE batch)
TEXT_BATCH = "text_batch"  # CLIP rows: 75-token chunks of the negative prompt and the prompt
UNET_BATCH = "unet_batch"  # U-Net rows: 2x images with guidance (uncond + cond), from several requests when batched
LATENT_H = "latent_height"
LATENT_W = "latent_width"
CONTEXT = "context_length"  # text positions seen by the U-Net: 77 per 75-token prompt chunk
IMAGE_H = "image_height"  # pixels (VAE encoder input, VAE decoder output)
IMAGE_W = "image_width"
LORA_RANK = "lora_rank"  # summed rank of a request's LoRAs (padded), when the export registered LoRAs
UPSCALE_H = "upscale_height"  # pixels of the tiles an upscaler model takes, when the export registered upscalers
UPSCALE_W = "upscale_width"
UPSCALED_H = "upscaled_height"  # ... and gives (its scale times theirs)
UPSCALED_W = "upscaled_width"
FACE_DETECT_H = "face_detect_height"  # pixels of the picture the face detector takes (short side 640), when the
FACE_DETECT_W = "face_detect_width"  # export registered face restorers
SINGLE = "single"  # one item a call (a face: A1111 restores them one at a time; a SwinIR tile), so Triton never
# batches those networks: the dim spans 1..1 and stays out of their ONNX graphs' dynamic axes
FACE_PRIORS = "face_priors"  # the detector's anchors: its outputs' rows, following its input's size
CAPTION_ROWS = "caption_rows"  # BLIP's captions decoded together: A1111's beams (interrogate_clip_num_beams)
CAPTION_TOKENS = "caption_tokens"  # a caption's tokens so far, the prompt's included
CLIP_TEXTS = "clip_texts"  # category lines CLIP encodes in one call (the CLIP interrogator's ranking)

# The models users call, and their tensors beside the request fields (each field is a [1]-shaped input named
# after it). Server, generator and clients all read these names from here.
TXT2IMG = "txt2img"  # also carries the spec itself, as its config parameter SPEC_PARAMETER
IMG2IMG = "img2img"
INIT_IMAGE = "init_image"  # img2img: [H, W, 3] uint8
MASK = "mask"  # inpainting: [H, W] uint8, white = repaint; absent for plain img2img
FIRSTPASS_IMAGE = "firstpass_image"  # txt2img with the hires fix: [H, W, 3] uint8, the first pass's picture
LATENT_MASK = "latent_mask"  # inpainting: [H, W] uint8, the latents' own mask (A1111's latent_mask); absent: the mask
IMAGES = "images"  # out: [N, H, W, 3] uint8
SEEDS = "seeds"  # out: [N] int64, the seed of each image
INFOTEXTS = "infotexts"  # out: [N] string, the A1111 infotext of each image, written from the plan the job ran
# The progress model: the job loops post each request's steps there under its Triton request id; clients read them.
PROGRESS = "progress"
PROGRESS_REQUEST_ID = "request_id"
PROGRESS_STEP = "step"  # steps done (-1: no such request, or no step yet)
PROGRESS_TOTAL = "total"
PROGRESS_PREVIEW = "preview"  # [h, w, 3] uint8, the latents' cheap colours (sdtrt.contract.previews); [0, 0, 3]: none yet
SPEC_PARAMETER = "sdtrt_spec"
ENGINES = "engines"  # ModelSpec.extra[ENGINES]: the TensorRT engine manifest, network -> file, GPU, TensorRT, profile
MODEL = "model"  # the request input naming which of the repository's models to use (absent: the default)
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's own defaults
# The engines the CPU runs networks on (sdtrt.pipeline.runners) and their precisions: here, so that the CLI and
# the config generator read them on a client-only install, which has neither engine
CPU_ENGINES = ("onnxruntime", "openvino")
CPU_PRECISIONS = ("fp32", "bf16")
# A served network's CPU engine picked by measurement at its first start (sdtrt.pipeline.runners.choose_cpu_engine):
# the fastest of the engines that compute what onnxruntime computes (and with bf16 asked, the bf16 ones too)
CPU_AUTO = "auto"
SERVED_CPU_ENGINES = (CPU_AUTO, *CPU_ENGINES)
CPU_CHOICE_FILE = "cpu_engine.json"  # beside a served network's ONNX: what ``auto`` chose there, and the timings
CPU_FAST_ENV = "SDTRT_CPU_FAST"  # "1" (`sdtrt serve --fast`): ``auto`` also measures bf16 where the CPU has it

# A dimension is either a fixed size or the name of a dynamic dimension listed in ModelSpec.dims.
DimValue = Union[int, str]


@dataclass(frozen=True)
class ExportLimits:
    """The request limits an export gets unless told otherwise (`sdtrt export --max-batch ...`)."""

    max_batch: int = 4  # images per request
    min_size: int = 64  # pixels a side
    max_size: int = 1024
    max_chunks: int = 3  # longest prompt, in 75-token chunks
    max_lora_rank: int = 64  # summed rank of one request's LoRAs (the LoRA inputs' profile), with --loras
    # Ceilings that keep one request from holding the server for minutes (refused by name, see request.validate):
    full_batch_steps: int = 50  # pixel-steps: max_batch images of max_size x max_size may take this many steps
    chars_per_token: int = 16  # prompt characters: max_chunks x 75 tokens of this many characters (weights, spaces)

    @staticmethod
    def largest(native: int) -> int:
        """The default largest side: max_size, or 1.5x the native size where that is more (SDXL's 1024 px native:
        1536, so its usual aspect buckets such as 1344x768 fit)."""
        return max(ExportLimits.max_size, native * 3 // 2 // 64 * 64)

    @staticmethod
    def pixel_steps(max_size: int, max_batch: int) -> int:
        return max_size * max_size * max_batch * ExportLimits.full_batch_steps

    @staticmethod
    def prompt_chars(max_chunks: int) -> int:
        return max_chunks * 75 * ExportLimits.chars_per_token


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int32", ...
    shape: tuple[DimValue, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class DimRange:
    """Optimisation-profile range of one dynamic dimension (also the limit enforced on requests)."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class ComponentSpec:
    """One exported network (text encoder, U-Net, VAE decoder) and its I/O signature."""

    name: str
    onnx: str  # path relative to the repository root
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, f"{self.name} input")

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, f"{self.name} output")

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> "ComponentSpec":
        return cls(
            name=name,
            onnx=data["onnx"],
            opset=data["opset"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
        )


@dataclass(frozen=True)
class FieldSpec:
    """One request field: its wire dtype, default and allowed values."""

    name: str
    dtype: str  # "string", "int64", "int32", "float32"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    max_length: int | None = None  # text fields: most characters

    def allowed(self) -> str:
        """Human-readable description of the allowed values, used in every error message."""
        if self.choices is not None:
            return "one of: " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.multiple_of:
            parts.append(f"a multiple of {self.multiple_of}")
        if self.minimum is not None and self.maximum is not None:
            parts.append(f"from {_num(self.minimum)} to {_num(self.maximum)}")
        elif self.minimum is not None:
            parts.append(f">= {_num(self.minimum)}")
        elif self.maximum is not None:
            parts.append(f"<= {_num(self.maximum)}")
        if self.dtype == "bool":
            return "true or false"
        if self.max_length is not None:
            parts.append(f"at most {self.max_length} characters")
        kind = "an integer" if self.dtype.startswith("int") else "a number" if self.dtype.startswith("float") else "text"
        return ", ".join([kind] + parts)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FieldSpec":
        data = dict(data)
        if data.get("choices") is not None:
            data["choices"] = tuple(data["choices"])
        return cls(**data)


@dataclass(frozen=True)
class ModelSpec:
    model_name: str
    source: str
    source_hash: str  # sha256 hex of the checkpoint (A1111's "Model hash" is its first 10 characters)
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    vae_scaling_factor: float  # latents are divided by this before decoding
    prediction_type: str
    scheduler_config: dict[str, Any]
    tokenizer: str  # tokenizer folder, relative to the repository root
    text_max_length: int  # token ids per CLIP chunk (77 for SD)
    text_hidden_size: int
    dims: dict[str, DimRange]
    components: dict[str, ComponentSpec]
    request: dict[str, FieldSpec]
    max_pixel_steps: int = 0  # width x height x images x steps (hires pass included) a request may take; 0: no ceiling
    schedules: dict[str, list[str]] = field(default_factory=dict)  # sampler -> the schedule types it accepts
    align_your_steps: list[float] = field(default_factory=list)  # the family's AYS levels (sdtrt.contract.schedules)
    name: str = ""  # its name in the repository (default: model_name, made safe for Triton model names)
    # Registered at export, used per request: name -> file (relative to the repository), hashes, rank / vectors.
    loras: dict[str, dict[str, Any]] = field(default_factory=dict)
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    vaes: dict[str, dict[str, Any]] = field(default_factory=dict)  # (VAE_NETWORKS)
    upscalers: dict[str, dict[str, Any]] = field(default_factory=dict)  # (upscaler_component)
    face_restorers: dict[str, dict[str, Any]] = field(default_factory=dict)  # (face_restorer_component)
    controlnets: dict[str, dict[str, Any]] = field(default_factory=dict)  # (controlnet_component)
    # by A1111's name: DeepBooru's tags; the CLIP interrogator's words and category lines (export/clip_interrogator.py)
    interrogators: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Live previews: (latent channels + 1) x 3, latents -> RGB in [0, 1], fitted to the VAE (sdtrt.contract.previews)
    latent_preview: list[list[float]] = field(default_factory=list)
    spec_version: int = SPEC_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_hash(self) -> str:
        return self.source_hash[:10]

    @property
    def key(self) -> str:
        """The model's name in its repository; its Triton models are named ``<key>__<network>``."""
        return safe_name(self.name or self.model_name)

    @property
    def title(self) -> str:
        """A1111's checkpoint title: the model's name in the repository (the file's stem unless the export named it)
        and its hash. The infotext's "Model" is the same name."""
        return f"{self.name or self.model_name} [{self.model_hash}]"

    def triton_name(self, component: str) -> str:
        return f"{self.key}__{component}"

    @property
    def max_chunks(self) -> int:
        """Longest prompt, in 75-token chunks: the U-Net's context length range allows this many."""
        return self.dims[CONTEXT].max // self.text_max_length

    def controlnet(self, name: str) -> dict[str, Any]:
        """A registered ControlNet by A1111's model name, found as the extension finds it: its title ("stem
        [hash]"), else its stem (any case), else the shortest stem holding the name; a wrong hash finds none."""
        entries = list(self.controlnets.values())
        found = next((e for e in entries if name == e["title"]), None)
        if found is None and not re.search(r"\[[0-9a-fA-F]+\]$", name):
            search = name.lower()
            found = next((e for e in entries if e["name"].lower() == search), None) or \
                min((e for e in entries if search in e["name"].lower()), key=lambda e: len(e["name"]), default=None)
        if found is None:
            allowed = ", ".join(repr(e["title"]) for e in entries) or "none: export with --controlnets DIR"
            raise InvalidRequest("controlnet model", name, f"one of this model's ControlNets: {allowed}")
        return found

    def typical_shape(self, tensor: TensorSpec) -> list[int]:
        """A tensor's shape at the export's optimal sizes (a request at the default size, with guidance): what an
        engine is measured at."""
        return [d if isinstance(d, int) else self.dims[d].opt for d in tensor.shape]

    def smallest_shape(self, tensor: TensorSpec) -> list[int]:
        """A tensor's shape at the smallest size every dynamic dim allows (warm-ups, the watchdog's probes)."""
        return [d if isinstance(d, int) else self.dims[d].min for d in tensor.shape]

    @property
    def tiles(self) -> bool:
        """Whether the export has the tiling variants (``sdtrt export --tiling``) that a ``tiling`` request runs."""
        return all(name + TILING_SUFFIX in self.components for name in TILING_NETWORKS)

    @property
    def hypertiles(self) -> bool:
        """Whether the export has the Hypertile variants (``sdtrt export --hypertile``)."""
        return all(name + HYPERTILE_SUFFIX in self.components for name in HYPERTILE_NETWORKS)

    @property
    def two_text_encoders(self) -> bool:
        """SDXL's: the text encoder network gives a pooled output beside the context."""
        return len(self.component("text_encoder").outputs) > 1

    def encoder_clip_skip(self, clip_skip: int, clip_l_skip: bool = False) -> int:
        """The text encoder's Clip skip input for a request: its Clip skip, or on SDXL (two encoders) with A1111's
        sdxl_clip_l_skip its negative (CLIP-L alone skips: export/networks/descriptors.py, DualTextEncoder)."""
        return -clip_skip if clip_l_skip and self.two_text_encoders else clip_skip

    def network(self, name: str, tiling: bool, vae: str = "") -> str:
        """The component a request runs for the network ``name``: its tiling variant when the request tiles, the
        registered VAE's encoder or decoder when it names one (``vaes``; "": the export's)."""
        if vae and name in VAE_NETWORKS:
            return vae_component(name, self.vaes[vae]["slug"])
        return name + TILING_SUFFIX if tiling and name in TILING_NETWORKS else name

    def component(self, name: str) -> ComponentSpec:
        try:
            return self.components[name]
        except KeyError:
            raise UsageError(f"the spec has no component {name!r}; it has {sorted(self.components)}") from None

    def field(self, name: str) -> FieldSpec:
        try:
            return self.request[name]
        except KeyError:
            raise UsageError(f"the spec has no request field {name!r}; it has {sorted(self.request)}") from None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["components"] = {
            name: {k: v for k, v in asdict(c).items() if k != "name"} for name, c in self.components.items()
        }
        data["request"] = [asdict(f) for f in self.request.values()]
        return data

    def save(self, repo_dir: Path, default: bool = False) -> Path:
        """Add (or replace) this model in the repository's catalog; the first model is the default."""
        repo = Path(repo_dir)
        catalog = load_catalog(repo) if (repo / SPEC_FILENAME).is_file() else Catalog(self.key, {})
        catalog.models[self.key] = self
        if default or catalog.default not in catalog.models:
            catalog.default = self.key
        return catalog.save(repo)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSpec":
        data = dict(data)
        if data.get("spec_version") != SPEC_VERSION:
            raise UsageError(
                f"spec_version {data.get('spec_version')!r} is not supported (this sdtrt reads {SPEC_VERSION}); "
                "re-run `sdtrt export` with this version of sdtrt"
            )
        data["dims"] = {k: DimRange(**v) for k, v in data["dims"].items()}
        data["components"] = {k: ComponentSpec.from_json(k, v) for k, v in data["components"].items()}
        data["request"] = {f["name"]: FieldSpec.from_json(f) for f in data["request"]}
        return cls(**data)


def safe_name(name: str) -> str:
    """A model name as a Triton model name and a file name can carry it."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


@dataclass
class Catalog:
    """Every model of a repository (or a server), by name, and the one a request that names none gets."""

    default: str
    models: dict[str, ModelSpec]

    def get(self, name: str | None = None) -> ModelSpec:
        if name in (None, ""):
            name = self.default
        try:
            return self.models[name]
        except KeyError:
            raise InvalidRequest(MODEL, name, "one of this server's models: " + ", ".join(map(repr, self.models)))

    def to_json(self) -> dict[str, Any]:
        return {"spec_version": SPEC_VERSION, "default": self.default,
                "models": {name: spec.to_json() for name, spec in self.models.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Catalog":
        if data.get("spec_version") != SPEC_VERSION:
            raise UsageError(
                f"spec_version {data.get('spec_version')!r} is not supported (this sdtrt reads {SPEC_VERSION}); "
                "re-run `sdtrt export` with this version of sdtrt"
            )
        return cls(data["default"], {name: ModelSpec.from_json(spec) for name, spec in data["models"].items()})

    def save(self, repo_dir: Path) -> Path:
        """Written aside, fsynced and renamed into place: a reader never sees half a catalog (sdtrt.contract.files)."""
        return write_atomic(Path(repo_dir) / SPEC_FILENAME, json.dumps(self.to_json(), indent=2) + "\n")


def load_catalog(repo_dir: str | Path) -> Catalog:
    """Read a model repository's catalog, with an error that says how to make one."""
    repo = Path(repo_dir)
    if not repo.is_dir():
        raise UsageError(f"REPO_DIR {str(repo)!r} does not exist; create it with `sdtrt export MODEL_DIR --out {repo}`")
    path = repo / SPEC_FILENAME
    if not path.is_file():
        raise UsageError(
            f"REPO_DIR {str(repo)!r} has no {SPEC_FILENAME}: it is not an sdtrt export. "
            f"Run `sdtrt export MODEL_DIR --out {repo}` first"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); re-run `sdtrt export`") from None
    return Catalog.from_json(data)


def load_spec(repo_dir: str | Path, model: str | None = None) -> ModelSpec:
    """One model's spec from a repository (the default model's unless ``model`` names another)."""
    return load_catalog(repo_dir).get(model)


def _by_name(tensors: tuple[TensorSpec, ...], name: str, what: str) -> TensorSpec:
    for t in tensors:
        if t.name == name:
            return t
    raise UsageError(f"no {what} named {name!r}; known: {[t.name for t in tensors]}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
