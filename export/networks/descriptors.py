"""Model descriptors: for each exported network, its torch wrapper, tensor names, dtypes and dynamic dims.

As in TensorRT's demo/Diffusion, these are kept apart from the code that runs engines and from the
pipeline: the exporter turns them into ONNX files and into the spec, and everything downstream reads
the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sdtrt.contract.schedules import ALIGN_YOUR_STEPS
from sdtrt.contract.spec import (  # noqa: F401  (the dim names are re-exported for the exporter's users)
    BATCH,
    CONTEXT,
    IMAGE_H,
    IMAGE_W,
    LATENT_H,
    LATENT_W,
    LORA_RANK,
    SINGLE,
    TEXT_BATCH,
    TILING_NETWORKS,
    TILING_SUFFIX,
    UNET_BATCH,
    DimRange,
    TensorSpec,
    dim_factor,
)
from sdtrt.export.networks.lora import WithLoraSlots, slot_width
from sdtrt.pipeline.conditioning import CONTEXT_INPUT, POOLED_INPUT, POOLED_OUTPUT, TEXT_OUTPUT, TIME_IDS
from sdtrt.requests.extra_networks import EMBEDDING_MARK, EMBEDDING_VECTORS, LORA_DOWN, LORA_SUFFIX, LORA_UP

OPSET = 17  # LayerNormalization is native from 17; TensorRT 8.6+ and onnxruntime 1.14+ parse it
ADDED_CONDITIONS = (POOLED_INPUT, TIME_IDS)  # SDXL U-Net inputs beyond the context, in order


@dataclass(frozen=True)
class Descriptor:
    name: str
    module: torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    make_inputs: Callable[[dict[str, int]], tuple[torch.Tensor, ...]]  # sample inputs for given dim sizes
    trace_dims: dict[str, int]  # the sizes the exporter traces at (see UNet: odd latent sizes on purpose)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }


class OnePerCall(Descriptor):
    """A network whose ONNX graph takes one item a call (a face; a SwinIR tile): its batch dim, SINGLE, spans 1..1
    (the configs give Triton a batch of at most one) and stays out of the graph's dynamic axes, as the exporter
    cannot trace the batch through these architectures (StyleGAN2's modulated convolutions make kernels out of it,
    SwinIR's window_reverse reads it as a number)."""

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {i: d for i, d in axes.items() if d != SINGLE} for name, axes in super().dynamic_axes().items()}


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """CLIP's final LayerNorm: under ``text_model`` in transformers 4, on the model itself in transformers 5.

    (diffusers 0.42's own ``clip_skip`` still looks under ``text_model`` and fails with transformers 5.)
    """
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


class _TokensOrVectors(torch.nn.Module):
    """CLIP's token embedding, except where the id is EMBEDDING_MARK: there, the request's embedding vector."""

    def __init__(self, table: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.table, self.vectors = table, vectors

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        marked = ids == EMBEDDING_MARK
        tokens = self.table(torch.where(marked, torch.zeros_like(ids), ids))
        return torch.where(marked.unsqueeze(-1), self.vectors.to(tokens.dtype), tokens)


class TextEncoder(torch.nn.Module):
    """CLIP text model: int32 token ids (TensorRT-friendly), textual-inversion vectors and a per-row Clip skip ->
    text embeddings.

    A1111's Clip skip n takes the output of the n-th layer from the end and applies CLIP's final layer norm;
    n = 1 is the usual last hidden state. Every layer's output is computed anyway, so picking one per row
    in the graph costs nothing and lets one engine serve every Clip skip. Embeddings (textual inversion) come
    in as vectors at the positions marked in the ids, so one engine serves every embedding.

    SDXL's encoders are read one layer lower (``skip_offset`` 1: the penultimate layer at Clip skip 1) without
    the final norm; its OpenCLIP encoder sees id 0 after the first end-of-text (``pad_after_eos``: (eos, pad), as
    A1111 pads it) and also gives its projected pooled output (``pooled``).
    """

    def __init__(self, text_encoder: torch.nn.Module, skip_offset: int = 0, final_norm: bool = True,
                 pad_after_eos: tuple[int, int] | None = None, pooled: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.skip_offset, self.final_norm, self.pad_after_eos, self.pooled = skip_offset, final_norm, pad_after_eos, pooled

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor, vectors: torch.Tensor):
        if self.pad_after_eos is not None:
            eos, pad = self.pad_after_eos
            ends = (input_ids == eos).to(torch.int32)
            after = (torch.cumsum(ends, dim=1) - ends) > 0
            input_ids = torch.where(after, torch.full_like(input_ids, pad), input_ids)
        table = self.text_encoder.get_input_embeddings()
        self.text_encoder.set_input_embeddings(_TokensOrVectors(table, vectors))
        try:
            out = self.text_encoder(input_ids.long(), output_hidden_states=True, return_dict=True)
        finally:
            self.text_encoder.set_input_embeddings(table)
        layers = torch.stack(out.hidden_states[1:], dim=1)  # [N, L, T, H], layer outputs before the final norm
        index = (layers.shape[1] - clip_skip.long() - self.skip_offset).reshape(-1, 1, 1, 1)
        picked = torch.gather(layers, 1, index.expand(-1, 1, *layers.shape[2:])).squeeze(1)
        if self.final_norm:
            picked = final_layer_norm(self.text_encoder)(picked)
        return (picked, out.text_embeds) if self.pooled else picked


class DualTextEncoder(torch.nn.Module):
    """SDXL's two text encoders as one network: the same ids (and Clip skip) through both, their penultimate
    layers side by side as the U-Net's context, and the second one's pooled projection. A negative Clip skip -n
    is A1111's sdxl_clip_l_skip: CLIP-L read at hidden_states[-n], OpenCLIP-G at its penultimate layer, as A1111
    reads them (it applies Clip skip to nothing else of SDXL)."""

    def __init__(self, first: torch.nn.Module, second: torch.nn.Module, eos: int, pad: int):
        super().__init__()
        self.first = TextEncoder(first, skip_offset=1, final_norm=False)
        self.second = TextEncoder(second, skip_offset=1, final_norm=False, pad_after_eos=(eos, pad), pooled=True)
        self.width = int(first.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor, vectors: torch.Tensor):
        a1111 = clip_skip < 0  # (each encoder reads one layer below its skip: -n - 1 is hidden_states[-n])
        first = torch.where(a1111, -clip_skip - 1, clip_skip)
        second = torch.where(a1111, torch.ones_like(clip_skip), clip_skip)
        a = self.first(input_ids, first, vectors[..., :self.width])
        b, pooled = self.second(input_ids, second, vectors[..., self.width:])
        return torch.cat([a, b], dim=-1), pooled


class UNet(torch.nn.Module):
    """The U-Net; SDXL's also takes its added conditions (pooled text embedding, size/crop time ids); with
    ControlNets, their residuals (``residuals`` of them: the skip connections', then the middle block's)."""

    def __init__(self, unet: torch.nn.Module, added: int = 0, residuals: int = 0):
        super().__init__()
        self.unet, self.added, self.residuals = unet, added, residuals

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        added, residuals = rest[:self.added], rest[self.added:self.added + self.residuals]
        extra = {"added_cond_kwargs": dict(zip(ADDED_CONDITIONS, added))} if added else {}
        if residuals:
            extra.update(down_block_additional_residuals=tuple(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1])
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **extra)[0]


class Circular(torch.nn.Module):
    """A network whose padded convolutions pad circularly while it runs, as A1111's Tiling sets every Conv2d of the
    U-Net and the VAE (circular padding wraps each edge to the opposite one, so the picture tiles seamlessly)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        # set per call, not once: the same modules also make the network's plain variant
        convs = [m for m in self.inner.modules() if isinstance(m, torch.nn.Conv2d) and any(m.padding)]
        modes = [conv.padding_mode for conv in convs]
        for conv in convs:
            conv.padding_mode = "circular"
        try:
            return self.inner(*inputs)
        finally:
            for conv, mode in zip(convs, modes):
                conv.padding_mode = mode


class VaeEncoder(torch.nn.Module):
    """Images in [-1, 1] -> the latent distribution's parameters (mean and log-variance, stacked on channels).

    Sampling stays outside the graph so that it draws from each image's own generator, as diffusers does.
    """

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image, return_dict=False)[0].parameters


class VaeDecoder(torch.nn.Module):
    """Scaled latents in, images in [-1, 1] out (the 1/scaling_factor is applied by the pipeline, as in diffusers)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


def dim_ranges(
    *, max_batch: int, min_size: int, native_size: int, max_size: int, vae_scale_factor: int, text_max_length: int,
    max_chunks: int, max_lora_rank: int = 0,
) -> dict[str, DimRange]:
    """Optimisation-profile ranges (and request limits) of every dynamic dim, from the model's size limits."""
    f = vae_scale_factor
    lora = {LORA_RANK: DimRange(1, min(32, max_lora_rank), max_lora_rank)} if max_lora_rank else {}
    return {
        **lora,
        BATCH: DimRange(1, 1, max_batch),
        TEXT_BATCH: DimRange(1, 2, 2 * max_chunks),
        UNET_BATCH: DimRange(1, 2, 2 * max_batch),
        LATENT_H: DimRange(min_size // f, native_size // f, max_size // f),
        LATENT_W: DimRange(min_size // f, native_size // f, max_size // f),
        IMAGE_H: DimRange(min_size, native_size, max_size),
        IMAGE_W: DimRange(min_size, native_size, max_size),
        CONTEXT: DimRange(text_max_length, text_max_length, text_max_length * max_chunks),
    }


def clip_skip_layers(pipe) -> int:
    """The largest Clip skip: the text encoder's layers (SDXL: the shallower encoder's, less the penultimate
    layer it starts from)."""
    second = getattr(pipe, "text_encoder_2", None)
    if second is None:
        return int(pipe.text_encoder.config.num_hidden_layers)
    return min(int(pipe.text_encoder.config.num_hidden_layers), int(second.config.num_hidden_layers)) - 1


def align_your_steps_levels(pipe) -> list[float]:
    """NVIDIA's Align Your Steps levels for the pipeline's family (SDXL's, or SD 1.5's as A1111 uses for the rest)."""
    return list(ALIGN_YOUR_STEPS["sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"])


def descriptors(pipe, text_max_length: int, lora_slots: dict | None = None, tiling: bool = False,
                residuals: tuple[TensorSpec, ...] = ()) -> list[Descriptor]:
    """The networks of a Stable Diffusion pipeline (SD 1.x/2.x, or SDXL with its second text encoder and the U-Net's
    added conditions), in pipeline order; with ``tiling``, also the tiling variants of the U-Net and VAE; with
    ``lora_slots`` (network -> its slots, ``sdtrt.export.networks.lora``), also the LoRA variants of those networks (and of
    their tiling variants); with ControlNets' ``residuals``, every U-Net variant takes them."""
    plain = [text_encoder_descriptor(pipe, text_max_length), unet_descriptor(pipe, text_max_length, residuals),
             vae_decoder_descriptor(pipe), vae_encoder_descriptor(pipe)]
    tiled = [with_tiling(desc) for desc in plain if tiling and desc.name in TILING_NETWORKS]
    lora = [with_lora(desc, getattr(pipe, network), lora_slots[network])
            for desc in plain + tiled for network in [desc.name.removesuffix(TILING_SUFFIX)]
            if network in (lora_slots or {})]
    return plain + tiled + lora


def with_tiling(desc: Descriptor) -> Descriptor:
    """The tiling variant of a network: the same tensors, its convolutions padded circularly."""
    return Descriptor(name=desc.name + TILING_SUFFIX, module=Circular(desc.module), inputs=desc.inputs,
                      outputs=desc.outputs, make_inputs=desc.make_inputs, trace_dims=desc.trace_dims)


def text_encoder_descriptor(pipe, text_max_length: int) -> Descriptor:
    """The text encoder(s): token ids, the Clip skip layer and the request's embedding vectors in; the context
    out (SDXL: both encoders' side by side, and the second one's pooled output)."""
    second = getattr(pipe, "text_encoder_2", None)
    encoders = [pipe.text_encoder] + ([second] if second is not None else [])
    hidden = sum(int(e.config.hidden_size) for e in encoders)  # the context width: SDXL's two side by side
    vocab = pipe.text_encoder.config.vocab_size
    layers = clip_skip_layers(pipe)
    outputs = (TensorSpec(TEXT_OUTPUT, "float32", (TEXT_BATCH, text_max_length, hidden)),)
    if second is not None:
        tokenizer = pipe.tokenizer_2
        module = DualTextEncoder(pipe.text_encoder, second, int(tokenizer.eos_token_id),
                                 int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0))
        outputs += (TensorSpec(POOLED_OUTPUT, "float32", (TEXT_BATCH, int(second.config.projection_dim))),)
    else:
        module = TextEncoder(pipe.text_encoder)

    def make_inputs(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
        n = d[TEXT_BATCH]
        ids = torch.randint(0, vocab - 1, (n, text_max_length), dtype=torch.int32)
        ids[:, 3:5] = EMBEDDING_MARK  # two positions take their vector from the request
        ids[:, 9] = vocab - 1  # the end of text: SDXL's second encoder pads after it
        return (ids, torch.randint(1, layers + 1, (n,), dtype=torch.int32), torch.randn(n, text_max_length, hidden))

    return Descriptor(
        name="text_encoder",
        module=module,
        inputs=(TensorSpec("input_ids", "int32", (TEXT_BATCH, text_max_length)),
                TensorSpec("clip_skip", "int32", (TEXT_BATCH,)),
                TensorSpec(EMBEDDING_VECTORS, "float32", (TEXT_BATCH, text_max_length, hidden))),
        outputs=outputs,
        make_inputs=make_inputs,
        trace_dims={TEXT_BATCH: 3},
    )


def unet_descriptor(pipe, text_max_length: int, residuals: tuple[TensorSpec, ...] = ()) -> Descriptor:
    """The U-Net: latents, timestep and context in (SDXL: also the pooled text and the time ids; with ControlNets,
    their ``residuals``), the noise prediction out."""
    latent_channels = pipe.vae.config.latent_channels
    unet_channels = pipe.unet.config.in_channels  # 9 for inpainting U-Nets: latents + mask + masked-image latents
    cross = pipe.unet.config.cross_attention_dim
    second = getattr(pipe, "text_encoder_2", None)
    added = pipe.unet.config.get("addition_embed_type") == "text_time"
    pooled = int(second.config.projection_dim) if second is not None else 0

    def make_inputs(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
        n, h, w = d[UNET_BATCH], d[LATENT_H], d[LATENT_W]
        plain = (
            torch.randn(n, unet_channels, h, w),
            torch.rand(n) * 999.0,
            torch.randn(n, d[CONTEXT], cross),
        )
        if added:
            plain += (torch.randn(n, pooled), torch.randint(0, 1024, (n, 6)).float())
        # each residual as small as its level's latents: LATENT_H/f rounded up (the downsamplers' sizes)
        return plain + tuple(torch.randn(n, r.shape[1], *(-(-size // dim_factor(str(d_))[1])
                                                          for size, d_ in zip((h, w), r.shape[2:]))) * 0.1
                             for r in residuals)

    added_inputs = (TensorSpec(POOLED_INPUT, "float32", (UNET_BATCH, pooled)),
                    TensorSpec(TIME_IDS, "float32", (UNET_BATCH, 6))) if added else ()
    return Descriptor(
        name="unet",
        module=UNet(pipe.unet, len(added_inputs), len(residuals)),
        inputs=(
            TensorSpec("sample", "float32", (UNET_BATCH, unet_channels, LATENT_H, LATENT_W)),
            TensorSpec("timestep", "float32", (UNET_BATCH,)),
            TensorSpec(CONTEXT_INPUT, "float32", (UNET_BATCH, CONTEXT, cross)),
            *added_inputs,
            *residuals,
        ),
        outputs=(TensorSpec("noise_pred", "float32", (UNET_BATCH, latent_channels, LATENT_H, LATENT_W)),),
        make_inputs=make_inputs,
        # diffusers' U-Net picks its upsampling code in Python from the traced size: at sizes its down/up path
        # divides evenly it bakes in "x2", which breaks other sizes. Tracing at odd sizes records the general
        # path (upsample to the skip connection's size), so the ONNX accepts every multiple of 8 pixels.
        trace_dims={UNET_BATCH: 2, LATENT_H: 9, LATENT_W: 11, CONTEXT: text_max_length},
    )


def vae_decoder_descriptor(pipe) -> Descriptor:
    latent_channels = pipe.vae.config.latent_channels

    def make_inputs(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
        return (torch.randn(d[BATCH], latent_channels, d[LATENT_H], d[LATENT_W]),)

    return Descriptor(
        name="vae_decoder",
        module=VaeDecoder(pipe.vae),
        inputs=(TensorSpec("latent", "float32", (BATCH, latent_channels, LATENT_H, LATENT_W)),),
        outputs=(TensorSpec("images", "float32", (BATCH, pipe.vae.config.out_channels, IMAGE_H, IMAGE_W)),),
        make_inputs=make_inputs,
        trace_dims={BATCH: 1, LATENT_H: 8, LATENT_W: 8},
    )


def vae_encoder_descriptor(pipe) -> Descriptor:
    latent_channels = pipe.vae.config.latent_channels
    channels = pipe.vae.config.in_channels
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def make_inputs(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
        return (torch.rand(d[BATCH], channels, d[LATENT_H] * f, d[LATENT_W] * f) * 2 - 1,)

    return Descriptor(
        name="vae_encoder",
        module=VaeEncoder(pipe.vae),
        inputs=(TensorSpec("image", "float32", (BATCH, channels, IMAGE_H, IMAGE_W)),),
        outputs=(TensorSpec("latent_parameters", "float32", (BATCH, 2 * latent_channels, LATENT_H, LATENT_W)),),
        make_inputs=make_inputs,
        trace_dims={BATCH: 1, LATENT_H: 8, LATENT_W: 8},
    )


def with_lora(desc: Descriptor, network: torch.nn.Module, slots: list) -> Descriptor:
    """The LoRA variant of a network: the same inputs, then the request's packed LoRA matrices (one per row)."""
    rows = desc.inputs[0].shape[0]
    d_in, d_out = slot_width(slots)

    def make_inputs(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
        plain = desc.make_inputs(d)
        n, rank = plain[0].shape[0], d.get(LORA_RANK, 3)
        return (*plain, torch.randn(n, rank, d_in) * 0.1, torch.randn(n, rank, d_out) * 0.1)

    return Descriptor(
        name=desc.name + LORA_SUFFIX,
        module=WithLoraSlots(desc.module, network, slots),
        inputs=(*desc.inputs, TensorSpec(LORA_DOWN, "float32", (rows, LORA_RANK, d_in)),
                TensorSpec(LORA_UP, "float32", (rows, LORA_RANK, d_out))),
        outputs=desc.outputs,
        make_inputs=make_inputs,
        trace_dims={**desc.trace_dims, LORA_RANK: 3},
    )
