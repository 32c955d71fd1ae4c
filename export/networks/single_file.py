"""Single-file checkpoints (civitai / A1111 ``.safetensors``, ``.ckpt``) without a config folder, offline.

The architecture is read from the weights: which text encoders the file carries (SD 1.x's CLIP, SD 2.x's OpenCLIP,
SDXL's two; an SDXL refiner's lone OpenCLIP is refused), the U-Net's levels, channels, attention and input channels (9 for inpainting), the VAE's
levels and channels, the text encoder's size. What the weights cannot say comes from the family's conventions
(``sdtrt.contract.architectures``): attention heads, the scheduler, the tokenizer, the native size. From that sdtrt writes a
diffusers config folder and lets diffusers' own single-file loader convert the weights with it.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtrt.contract import architectures as arch
from sdtrt.contract.errors import UsageError
from sdtrt.pipeline.clip_vocab import write_clip_tokenizer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_TEXT = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
OPEN_CLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP = "conditioner.embedders.0.model."


@dataclass
class Weights:
    """A checkpoint's tensor names and shapes (read without loading safetensors' data)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    # A .ckpt that needed pickle (trusted with --allow-pickle): its tensors, for diffusers, which reads .ckpt files
    # weights-only and so could not read this one; they go to it as a temporary .safetensors.
    unpickled: dict[str, Any] | None = field(default=None, repr=False)

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.shapes.get(key)

    def has(self, key: str) -> bool:
        return key in self.shapes

    def count(self, pattern: str) -> int:
        """How many distinct values the ``(\\d+)`` in ``pattern`` takes among the keys."""
        regex = re.compile(pattern)
        return len({m.group(1) for key in self.shapes if (m := regex.match(key))})


def read_weights(path: Path, allow_pickle: bool = False) -> Weights:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return Weights(path, {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except Exception as exc:
            raise UsageError(f"{path}: not a readable .safetensors file ({exc}); is it complete?") from None
    if path.suffix == ".ckpt":
        # checkpoint.py imports this module: importing it back at the top would be circular
        from sdtrt.export.networks.checkpoint import torch_load

        data, needed = torch_load(path, allow_pickle, "checkpoint")
        while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):  # as diffusers unwraps it
            data = data["state_dict"]
        state = {k: v for k, v in data.items() if hasattr(v, "shape")} if isinstance(data, dict) else {}
        return Weights(path, {k: tuple(v.shape) for k, v in state.items()}, unpickled=state if needed else None)
    raise UsageError(f"{path}: a single-file checkpoint must be .safetensors or .ckpt")


@dataclass
class Architecture:
    family: arch.Family
    inpainting: bool
    prediction_type: str
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # component -> diffusers config

    def describe(self) -> str:
        kind = ", inpainting (9-channel U-Net)" if self.inpainting else ""
        unet = self.configs["unet"]
        size = unet["sample_size"] * 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)
        return f"{self.family.name}{kind}, {self.prediction_type}, {size}x{size} native"


def detect(weights: Weights, prediction_type: str | None = None) -> Architecture:
    """The architecture of a checkpoint, with a clear error for what sdtrt does not serve."""
    name = weights.path.name
    if weights.has(REFINER_OPEN_CLIP + "token_embedding.weight"):
        raise UsageError(f"{name} is an SDXL refiner: sdtrt does not serve A1111's Refiner checkpoint (an "
                         "architecture of its own: one OpenCLIP, aesthetic scores); export the SDXL base model (a "
                         "request's refiner_checkpoint may name another base model of the server)")
    if not weights.has(UNET + "input_blocks.0.0.weight"):
        raise UsageError(f"{name} is not a Stable Diffusion checkpoint: it has no U-Net ({UNET}*); "
                         f"its first keys are {sorted(weights.shapes)[:3]}")
    if not weights.has(VAE + "encoder.conv_in.weight"):
        raise UsageError(f"{name} has no VAE ({VAE}*): sdtrt exports whole checkpoints; pass a full one")
    text_prefix = next((p for p in CLIP_TEXT if weights.has(p + "embeddings.token_embedding.weight")), None)
    extra: dict[str, dict[str, Any]] = {}
    if weights.has(SDXL_CLIP + "embeddings.token_embedding.weight"):
        family, text = arch.SDXL, _clip_config(weights, SDXL_CLIP)
        extra["text_encoder_2"] = _open_clip_config(weights, SDXL_OPEN_CLIP, arch.SDXL)
    elif text_prefix is not None:
        family, text = arch.SD1, _clip_config(weights, text_prefix)
    elif weights.has(OPEN_CLIP + "token_embedding.weight"):
        family, text = arch.SD2, _open_clip_config(weights, OPEN_CLIP, arch.SD2)
    else:
        raise UsageError(f"{name}: no text encoder this sdtrt knows (SD 1.x CLIP or SD 2.x OpenCLIP)")
    unet = ldm_unet_config(weights, family, extra.get("text_encoder_2", {}).get("projection_dim"))
    vae = _vae_config(weights, family)
    prediction = prediction_type or family.prediction_type
    unet.update(family.unet_for(prediction))
    return Architecture(family, unet["in_channels"] == 2 * vae["latent_channels"] + 1, prediction,
                        {"unet": unet, "vae": vae, "text_encoder": text, **extra,
                         "scheduler": {**family.scheduler, "prediction_type": prediction}})


def ldm_unet_config(w: Weights, family: arch.Family, pooled: int | None = None, prefix: str = UNET) -> dict[str, Any]:
    """A U-Net's diffusers config from its LDM keys under ``prefix`` (a ControlNet's: its encoder half, no prefix)."""
    channels, in_channels = w.shape(prefix + "input_blocks.0.0.weight")[:2]
    levels: list[dict[str, Any]] = [{"resnets": 0, "channels": channels, "attention": False, "depth": 1}]
    for i in range(1, w.count(re.escape(prefix) + r"input_blocks\.(\d+)\.") + 1):
        block = f"{prefix}input_blocks.{i}."
        if w.has(block + "0.op.weight"):
            levels.append({"resnets": 0, "channels": channels, "attention": False, "depth": 1})
        elif w.has(block + "0.out_layers.3.weight"):
            levels[-1]["resnets"] += 1
            levels[-1]["channels"] = w.shape(block + "0.out_layers.3.weight")[0]
            levels[-1]["attention"] |= w.has(block + "1.proj_in.weight")
            depth = w.count(re.escape(block) + r"1\.transformer_blocks\.(\d+)\.")
            levels[-1]["depth"] = max(depth, 1)
    per_level = {level["resnets"] for level in levels}
    if len(per_level) != 1:
        raise UsageError(f"{w.path.name}: U-Net levels with {sorted(per_level)} blocks each; not an SD 1.x/2.x U-Net")
    attn_k = next((shape for key, shape in w.shapes.items() if key.startswith(prefix) and key.endswith("attn2.to_k.weight")),
                   None)
    proj_in = next((shape for key, shape in w.shapes.items() if key.startswith(prefix) and key.endswith("proj_in.weight")),
                   None)
    block_out = [level["channels"] for level in levels]
    return {
        "sample_size": family.sample_size,
        "in_channels": in_channels,
        "out_channels": (w.shape(prefix + "out.2.weight") or (in_channels,))[0],
        "block_out_channels": block_out,
        "layers_per_block": per_level.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if lv["attention"] else "DownBlock2D" for lv in levels],
        "up_block_types": ["CrossAttnUpBlock2D" if lv["attention"] else "UpBlock2D" for lv in reversed(levels)],
        "cross_attention_dim": attn_k[1] if attn_k else 768,
        "use_linear_projection": proj_in is not None and len(proj_in) == 2,
        "attention_head_dim": family.unet_heads(block_out),
        **_added_conditions(w, levels, pooled, prefix),
    }


def _added_conditions(w: Weights, levels: list[dict[str, Any]], pooled: int | None, prefix: str = UNET
                      ) -> dict[str, Any]:
    """SDXL's U-Net: transformer depth per level, and the embedding of its added conditions (the pooled text
    embedding and 6 time ids, each embedded ``addition_time_embed_dim`` wide) read from ``label_emb``'s width."""
    if pooled is None:
        return {}
    added = w.shape(prefix + "label_emb.0.0.weight")[1]
    return {
        "transformer_layers_per_block": [level["depth"] for level in levels],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (added - pooled) // 6,
        "projection_class_embeddings_input_dim": added,
    }


def _vae_config(w: Weights, family: arch.Family) -> dict[str, Any]:
    levels = w.count(re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    latent = w.shape(VAE + "quant_conv.weight")[0] // 2
    return {
        "in_channels": w.shape(VAE + "encoder.conv_in.weight")[1],
        "out_channels": w.shape(VAE + "decoder.conv_out.weight")[0],
        "latent_channels": latent,
        "block_out_channels": [w.shape(f"{VAE}encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)],
        "layers_per_block": w.count(re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "scaling_factor": family.vae_scaling_factor,
        "sample_size": family.sample_size * 2 ** (levels - 1),
    }


def _clip_config(w: Weights, prefix: str) -> dict[str, Any]:
    vocab, hidden = w.shape(prefix + "embeddings.token_embedding.weight")
    return arch.SD1.text_config(
        vocab_size=vocab, hidden_size=hidden,
        max_position_embeddings=w.shape(prefix + "embeddings.position_embedding.weight")[0],
        num_hidden_layers=w.count(re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
        intermediate_size=w.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
    )


def _open_clip_config(w: Weights, prefix: str, family: arch.Family) -> dict[str, Any]:
    vocab, hidden = w.shape(prefix + "token_embedding.weight")
    blocks = w.count(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    sizes = dict(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=w.shape(prefix + "positional_embedding")[0],
                 intermediate_size=w.shape(prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0])
    if family is arch.SDXL:  # the whole tower, and its projection (the pooled output)
        config = {**family.text_2, **sizes, "num_hidden_layers": blocks,
                  "num_attention_heads": max(1, hidden // arch.HEAD_SIZE),
                  "projection_dim": w.shape(prefix + "text_projection")[1]}
        return config
    # SD 2.x reads the penultimate layer: the text model stops one layer short of the tower (as diffusers')
    return family.text_config(**sizes, num_hidden_layers=blocks - 1)


def write_config_folder(architecture: Architecture, out: Path, clip_bpe: Path | None = None) -> Path:
    """A diffusers pipeline folder without weights: model_index.json, each component's config, the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    family = architecture.family
    components = {
        "unet": ("diffusers", "UNet2DConditionModel", "config.json"),
        "vae": ("diffusers", "AutoencoderKL", "config.json"),
        "text_encoder": ("transformers", "CLIPTextModel", "config.json"),
        "scheduler": ("diffusers", family.scheduler_class, "scheduler_config.json"),
    }
    index = {"_class_name": "StableDiffusionPipeline", "tokenizer": ["transformers", "CLIPTokenizer"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    if "text_encoder_2" in architecture.configs:
        components["text_encoder_2"] = ("transformers", "CLIPTextModelWithProjection", "config.json")
        index = {"_class_name": "StableDiffusionXLPipeline", "tokenizer": ["transformers", "CLIPTokenizer"],
                 "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
        write_clip_tokenizer(out / "tokenizer_2", clip_bpe, pad_token="!")
    for name, (library, cls, filename) in components.items():
        index[name] = [library, cls]
        (out / name).mkdir(exist_ok=True)
        config = {"_class_name": cls, **architecture.configs[name]}
        if library == "transformers":
            config = {"architectures": [cls], "model_type": "clip_text_model", **architecture.configs[name]}
        (out / name / filename).write_text(json.dumps(config, indent=2))
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    write_clip_tokenizer(out / "tokenizer", clip_bpe, pad_token=family.pad_token)
    return out


def uses_v_prediction(unet) -> bool:
    """A1111's test for SD 2.x weights: at the last timestep, from a flat latent and a flat context, an epsilon
    model predicts about the latent itself, a v-prediction model something well below it."""
    with torch.no_grad():
        sample = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
        context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
        out = unet(sample, torch.tensor([999]), encoder_hidden_states=context).sample
    return (out[:, :4] - sample[:, :4]).mean().item() < -1


def load_single_file(path: Path, config: Path | None, *, allow_pickle: bool, prediction_type: str | None, report,
                     load):
    """The pipeline of a single-file checkpoint, offline: its architecture read from the weights (or ``config``,
    a diffusers folder), said in one line. ``load(open_pipeline, what)`` is the caller's loader. A ``.ckpt`` is read
    weights-only (``sdtrt.export.networks.checkpoint.torch_load``) before diffusers sees it; one that needed pickle goes to
    diffusers as a temporary ``.safetensors`` of its tensors."""
    what = repr(str(path))
    weights = read_weights(path, allow_pickle) if config is None or path.suffix == ".ckpt" else None
    with tempfile.TemporaryDirectory(prefix="sdtrt-config-") as tmp:
        source = str(path)
        if weights is not None and weights.unpickled is not None:
            source = str(_tensors_file(weights.unpickled, Path(tmp) / f"{path.stem}.safetensors"))
            weights.unpickled = None
        if config is not None:
            kind = json.loads((Path(config) / "model_index.json").read_text()).get("_class_name", "")
            pipe = load(lambda sd, **kw: sd.from_single_file(source, config=str(config), **kw), what,
                        xl=kind.startswith("StableDiffusionXL"))
            if prediction_type:
                pipe.scheduler.register_to_config(prediction_type=prediction_type)
            report(f"{path.name}: configured by {config}")
            return pipe
        architecture = detect(weights, prediction_type)
        folder = write_config_folder(architecture, Path(tmp) / "config")
        xl = architecture.family is arch.SDXL
        pipe = load(lambda sd, **kw: sd.from_single_file(source, config=str(folder), **kw), what, xl=xl)
        if architecture.family is arch.SD2 and prediction_type is None and uses_v_prediction(pipe.unet):
            architecture = detect(weights, "v_prediction")
            folder = write_config_folder(architecture, Path(tmp) / "config-v")
            pipe = load(lambda sd, **kw: sd.from_single_file(source, config=str(folder), **kw), what)
    report(f"{path.name}: {architecture.describe()} (read from its weights)")
    return pipe


def _tensors_file(tensors: dict[str, Any], path: Path) -> Path:
    """``tensors`` saved as a .safetensors file (tensors that share memory saved as copies, as the format needs)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    save_file(out, str(path))
    return path
