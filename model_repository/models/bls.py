"""The networks as the jobs see them (``sdtrt.pipeline.jobs.Networks``), served: BLS calls to the Triton network models.

Each call names the spec's tensors. The U-Net calls of the loops a job instance runs at once are merged into one
call (``step_batcher.py``); Triton's dynamic batcher may merge calls from other job models too. A cancelled
request stops at its next network call (the tokenizer, the text encoder, every U-Net step).

Where the data lives: the loop runs on ``device`` (a GPU when its model instance is ``KIND_GPU``, else the
CPU). Tensors cross into and out of Triton through DLPack, never through NumPy, and every BLS request names
the memory it wants its outputs in (``preferred_memory``): the loop's device for the U-Net and the VAE
encoder, so that a TensorRT network's GPU outputs stay on the GPU step after step; the CPU for the decoded
pictures, which become PNGs. Without that request a ``tensorrt_plan`` model answers in GPU memory, which
``as_numpy()`` cannot read. CPU and GPU take the same code path; only the memory type differs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from sdtrt.contract.errors import Cancelled, InvalidRequest, RelayedInvalidRequest, Unavailable, invalid_field
from sdtrt.contract.images import to_uint8
from sdtrt.contract.spec import HYPERTILE_INPUT, HYPERTILE_SUFFIX, MODEL, ComponentSpec, ModelSpec
from sdtrt.model_repository.configs import (
    CLIP_SKIP_ROWS,
    NEGATIVE_PIECES,
    PIECE_TEXTS,
    PIECE_WEIGHTS,
    TOKEN_IDS,
    TOKEN_WEIGHTS,
    TOKENIZER,
    TOKENIZER_FIELDS,
)
from sdtrt.model_repository.models.loop_networks import LoopNetworks
from sdtrt.model_repository.models.step_batcher import StepBatcher
from sdtrt.pipeline.conditioning import Conditioning, prompt_conditioning, unet_inputs, unet_network
from sdtrt.requests.extra_networks import EMBEDDING_VECTORS, LORA_SUFFIX, RequestLoras, no_loras
from sdtrt.postprocessing.faces import FaceNetworks, face_networks
from sdtrt.postprocessing.model_upscale import ModelUpscaler, model_upscaler
from sdtrt.requests.plan import TextPair

# Every BLS call has a deadline: a stage that hangs (a stopped or deadlocked stub) must fail the request, not hold
# its loop for good. Triton's own request timeout only applies while a request waits in a queue, so the call runs on
# a caller thread and the loop waits for it with a timeout. A call gets the floor plus a share of the span in
# proportion to its work (its first input's elements against the spec's largest): the largest U-Net call of a
# full-size model on a CPU takes tens of seconds. `sdtrt serve`'s watchdog notices a hung stage much sooner
# (sdtrt.model_repository.serving.health); these deadlines are the backstop. SDTRT_CALL_TIMEOUT_S moves the floor.
CALL_TIMEOUT_FLOOR_S = float(os.environ.get("SDTRT_CALL_TIMEOUT_S", 60.0))
CALL_TIMEOUT_SPAN_S = 240.0
_CALLERS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="bls")  # shared by the loops of one stub
# A request's cancellation is a round trip to the Triton process (``is_cancelled()``); asked at most this often
# instead of before every network call: a GPU step is ~10 ms, and a cancelled request still stops within a step or
# a few (benchmarks/overhead_trace.py measures what a call costs).
CANCEL_CHECK_S = 0.05


def call_deadline(spec: ModelSpec, component: ComponentSpec | None, inputs: tuple = ()) -> float:
    """Seconds one call may take: the floor, plus the span scaled by how much of the largest call it is."""
    if component is None or not inputs or not component.inputs:
        return CALL_TIMEOUT_FLOOR_S
    largest = 1
    for dim in component.inputs[0].shape:
        largest *= dim if isinstance(dim, int) else spec.dims[dim].max
    return CALL_TIMEOUT_FLOOR_S + CALL_TIMEOUT_SPAN_S * min(1.0, inputs[0].numel() / max(largest, 1))


def exec_within(request: "pb_utils.InferenceRequest", model: str, deadline_s: float):
    """``request.exec()``, or Unavailable naming ``model`` when it has not answered within ``deadline_s``."""
    future = _CALLERS.submit(request.exec)
    try:
        return future.result(timeout=deadline_s)
    except FutureTimeout:
        # The caller thread stays blocked until the stage answers or its stub is killed (the watchdog's job).
        raise Unavailable(f"{model} did not answer within {deadline_s:.0f} s (a hung stage: sdtrt serve's watchdog "
                          "restarts it); send the request again in a minute") from None


def raise_nested(model: str, error) -> None:
    """Raise a nested model's error as what it is: its code and its words survive the hop (sdtrt.contract.errors)."""
    message = error.message()
    code = error.code() if hasattr(error, "code") else None
    # Triton 2.51 hands a BLS caller every nested error as INTERNAL, so sdtrt's own refusals are also known by
    # their words: every InvalidRequest reads "invalid FIELD=VALUE: ..." (sdtrt.contract.errors).
    if code == pb_utils.TritonError.INVALID_ARG or invalid_field(message) is not None:
        raise RelayedInvalidRequest(message)
    if code == pb_utils.TritonError.CANCELLED:
        raise Cancelled(message)
    if code == pb_utils.TritonError.UNAVAILABLE or ("Stub process" in message and "not healthy" in message):
        # a queue full, or a stub that died or was killed as hung: the watchdog is bringing the model back
        raise Unavailable(f"{model} is unavailable ({message}); send the request again in a minute")
    raise RuntimeError(f"{model}: {message}")


def preferred_memory(device: torch.device) -> "pb_utils.PreferredMemory":
    """Where Triton should put a BLS response's outputs: ``device``'s memory."""
    if device.type == "cuda":
        return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device.index or 0)
    return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)


def to_triton(name: str, tensor: torch.Tensor) -> "pb_utils.Tensor":
    """A torch tensor (CPU or GPU) as a Triton tensor, sharing its memory (DLPack needs C order)."""
    return pb_utils.Tensor.from_dlpack(name, tensor.contiguous())


def from_triton(tensor: "pb_utils.Tensor") -> torch.Tensor:
    """A Triton tensor as a torch tensor on the same device, sharing its memory (DLPack, stream-ordered)."""
    return torch.from_dlpack(tensor)


@dataclass(frozen=True)
class StepCalls:
    """How a loop's per-step network calls are made: ``batcher`` merges them with other loops' (up to ``rows``
    rows a call); ``local`` runs them in this process instead of through BLS (loop_networks.py)."""

    batcher: StepBatcher | None = None
    rows: int = 0
    local: LoopNetworks | None = None


class BlsNetworks:
    """One request's view of the networks. Every call first checks whether the client has gone (cancelled, or
    its connection closed): the job model holds the client's own request, so that is seen within a step or a few
    (asked at most every CANCEL_CHECK_S)."""

    def __init__(self, spec: ModelSpec, request, device: torch.device = torch.device("cpu"),
                 loras: RequestLoras | None = None, steps: StepCalls = StepCalls(), tiling: bool = False,
                 vae: str = ""):
        """``steps``: how the per-step calls go (merged with other loops', in this process or not);
        ``tiling``: run the networks' tiling variants; ``vae``: the registered VAE that encodes and decodes."""
        self.local = steps.local
        self.spec = spec
        self.request = request
        self.tiling, self.vae = tiling, vae
        self.device = device
        self.loras = loras or no_loras()
        self.batcher = steps.batcher
        self.unet_rows = steps.rows
        self._asked = float("-inf")  # when is_cancelled() was last asked (time.monotonic())

    def _check_cancelled(self) -> None:
        now = time.monotonic()
        if now - self._asked < CANCEL_CHECK_S:
            return
        self._asked = now
        if self.request.is_cancelled():
            raise Cancelled("request cancelled by the client")

    def _exec(self, model: str, inputs: list, outputs: list[str], memory: torch.device,
              deadline_s: float = CALL_TIMEOUT_FLOOR_S) -> dict[str, torch.Tensor]:
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=outputs, inputs=inputs, preferred_memory=preferred_memory(memory),
        )
        response = exec_within(request, model, deadline_s)
        if response.has_error():
            message = response.error().message()
            if "unknown model" in message or "is not ready" in message or "not found" in message:
                raise InvalidRequest(MODEL, self.spec.key, "a model this server has loaded: it is unloaded "
                                     f"(`sdtrt models load {self.spec.key}` loads it)") from None
            raise_nested(model, response.error())
        # Copies on ``memory``: the response's buffers go back to Triton's pools straight away.
        return {name: from_triton(pb_utils.get_output_tensor_by_name(response, name)).to(memory, copy=True)
                for name in outputs}

    def _network(self, name: str, inputs: tuple[torch.Tensor, ...], output_device: torch.device) -> dict[str, torch.Tensor]:
        """A network the request's LoRAs change runs as its LoRA variant, with their matrices as two more inputs."""
        lora = self.loras.inputs(name, len(inputs[0]), self.device)
        variant = self.spec.network(name, self.tiling, self.vae)
        if lora is None:
            return self._call(self.spec.component(variant), inputs, output_device)
        return self._call(self.spec.component(variant + LORA_SUFFIX), (*inputs, *lora), output_device)

    def _call(self, component: ComponentSpec, inputs: tuple[torch.Tensor, ...],
              output_device: torch.device) -> dict[str, torch.Tensor]:
        self._check_cancelled()
        values = []
        for spec, value in zip(component.inputs, inputs):
            value = value.to(device=self.device, dtype=getattr(torch, spec.dtype))
            if len(spec.shape) == 1:  # per-row scalars travel as [N, 1] (Triton needs a non-batch dim)
                value = value.reshape(-1, 1)
            values.append(value)
        model, outputs = self.spec.triton_name(component.name), [t.name for t in component.outputs]

        def run(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            if self.local is not None and self.local.runs(component):
                return {k: v.to(output_device) for k, v in self.local.run(self.spec, component, tensors).items()}
            triton = [to_triton(spec.name, value) for spec, value in zip(component.inputs, tensors)]
            return self._exec(model, triton, outputs, output_device, call_deadline(self.spec, component, tuple(tensors)))

        if self.batcher is None or not component.name.startswith("unet"):
            return run(values)
        key = (model, output_device, tuple(tuple(v.shape[1:]) for v in values))
        if component.inputs[-1].name == HYPERTILE_INPUT:  # rows share one call's tiles: only equal draws merge
            key += (tuple(values[-1][0].tolist()),)
        return self.batcher.call(key, values, self.unet_rows, run)

    def encode_texts(self, texts: TextPair, clip_skip: int, clip_l_skip: bool = False
                     ) -> tuple[Conditioning, Conditioning]:
        """(uncond, cond) conditioning: the tokenizer model (A1111 chunks and weights of the pair's pieces, as the
        plan parsed them), then the text encoder."""
        cpu = torch.device("cpu")
        pieces = texts.negative + texts.prompt
        fields = [  # strings have no DLPack form
            pb_utils.Tensor(PIECE_TEXTS, np.array([text.encode("utf-8") for text, _ in pieces], dtype=np.object_)),
            pb_utils.Tensor(PIECE_WEIGHTS, np.array([weight for _, weight in pieces], dtype=np.float32)),
            pb_utils.Tensor(NEGATIVE_PIECES, np.array([len(texts.negative)], dtype=np.int32)),
        ]
        # the request fields the tokenizer takes, by configs.TOKENIZER_FIELDS
        settings = {"clip_skip": clip_skip, "sdxl_clip_l_skip": clip_l_skip,
                    "comma_padding_backtrack": texts.backtrack}
        fields += [pb_utils.Tensor(name, np.array([settings[name]], dtype=self.spec.field(name).dtype))
                   for name in TOKENIZER_FIELDS]
        self._check_cancelled()
        tokens = self._exec(self.spec.triton_name(TOKENIZER), fields,
                            [TOKEN_IDS, TOKEN_WEIGHTS, CLIP_SKIP_ROWS, EMBEDDING_VECTORS], cpu)
        outputs = self._network("text_encoder", (tokens[TOKEN_IDS], tokens[CLIP_SKIP_ROWS],
                                                 tokens[EMBEDDING_VECTORS]), cpu)
        return prompt_conditioning({k: v.numpy() for k, v in outputs.items()}, tokens[TOKEN_WEIGHTS].numpy(),
                                   texts.normalize)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: Conditioning) -> torch.Tensor:
        name = unet_network(context)
        outputs = self._network(name, (sample, timestep, *unet_inputs(self.spec, context, sample)), self.device)
        return outputs[self.spec.component(name).outputs[0].name]

    def controlnet(self, network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One ControlNet's residuals for the U-Net call's rows (``inputs`` by the network's input names)."""
        component = self.spec.component(network)
        return self._call(component, tuple(inputs[t.name] for t in component.inputs), self.device)

    def _single(self, name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A one-input, one-output network's answer (the VAE's), by the spec's tensor names."""
        component = self.spec.component(self.spec.network(name, self.tiling, self.vae))
        return self._call(component, (value,), device)[component.outputs[0].name]

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._single("vae_encoder", images, self.device)

    def vae_decode(self, latents: torch.Tensor, hypertile: torch.Tensor | None = None) -> np.ndarray:
        if hypertile is None:
            return to_uint8(self._single("vae_decoder", latents, torch.device("cpu")).numpy())
        component = self.spec.component("vae_decoder" + HYPERTILE_SUFFIX)
        out = self._call(component, (latents, hypertile), torch.device("cpu"))
        return to_uint8(out[component.outputs[0].name].numpy())

    def _numpy_call(self, name: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        """A network on numpy arrays, its outputs on the CPU by name (the upscaler's and face networks' calls)."""
        outputs = self._call(self.spec.component(name), tuple(torch.from_numpy(a) for a in arrays), torch.device("cpu"))
        return {key: value.numpy() for key, value in outputs.items()}

    def face_networks(self, restorer: str, weight: float) -> FaceNetworks:
        """The face networks, each call through its Triton model (and a check for cancellation)."""
        return face_networks(self.spec, restorer, weight, self._numpy_call)

    def upscaler(self, name: str) -> ModelUpscaler:
        """A registered upscaler model, its tiles through its Triton model (each call checks for cancellation)."""
        return model_upscaler(self.spec, name, self._numpy_call)
