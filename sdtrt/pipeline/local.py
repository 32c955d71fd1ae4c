"""The in-process reference runner: txt2img and img2img from an exported repository, no server (the networks on
onnxruntime, OpenVINO or TensorRT: ``sdtrt.pipeline.runners``).

It runs the same plan through the same ``run`` as the served job models (tokenizer -> text encoder -> the denoising
loop with the U-Net -> VAE decoder -> uint8 pictures), so served images can be checked against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdtrt.contract.images import to_uint8
from sdtrt.contract.spec import CPU_AUTO, HYPERTILE_SUFFIX, ModelSpec, controlnet_image, load_spec
from sdtrt.pipeline.conditioning import Conditioning, prompt_conditioning, unet_inputs, unet_network
from sdtrt.pipeline.engines import check_engine_matches, manifest
from sdtrt.pipeline import jobs
from sdtrt.pipeline.jobs import OnStep
from sdtrt.pipeline.runners import CPU_ENGINES, Runner, TensorRtRunner, auto_runner, cpu_runner
from sdtrt.pipeline.text import load_tokenizer
from sdtrt.requests.extra_networks import LORA_SUFFIX, EmbeddingTable, LoraLibrary, RequestLoras
from sdtrt.requests.generation import Generation, infotexts
from sdtrt.postprocessing.faces import FaceNetworks, face_networks
from sdtrt.postprocessing.model_upscale import ModelUpscaler, model_upscaler
from sdtrt.requests.plan import Plan, TextPair, plan_request
from sdtrt.requests.prompts import piece_rows
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest

BACKENDS = (*CPU_ENGINES, CPU_AUTO, "tensorrt")


class LocalPipeline:
    device = torch.device("cpu")  # the loop's tensors; the networks take and give NumPy arrays

    def __init__(self, repo_dir: str | Path, threads: int = 0, backend: str = "onnxruntime", model: str | None = None,
                 precision: str = "fp32"):
        """One model of an exported repository (``model``; default: its default model), its networks run by
        ``backend``: a CPU engine (onnxruntime, openvino at ``precision``) or its TensorRT engines."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.repo = Path(repo_dir)
        self.engine = (threads, backend, precision)
        self.spec: ModelSpec = load_spec(self.repo, model)
        self.others: dict[str, LocalPipeline] = {}  # the repository's other models, as a request names them
        self.tokenizer = load_tokenizer(self.repo / self.spec.tokenizer, self.spec.text_max_length)
        self.nets: dict[str, Runner] = {}
        if backend == "tensorrt":
            engines = manifest(self.spec)
            for name, component in self.spec.components.items():
                check_engine_matches(engines[name], name)
                path = self.repo / self.spec.triton_name(name) / "1" / engines[name]["file"]
                self.nets[name] = TensorRtRunner(path, component)
        elif backend == CPU_AUTO:  # each network on the engine measured fastest here: the served networks' choice
            self.choices = {}
            for name, c in self.spec.components.items():
                self.nets[name], self.choices[name] = auto_runner(self.spec, c, self.repo / c.onnx, precision, threads)
        else:
            self.nets = {name: cpu_runner(self.repo / c.onnx, c, backend, precision, threads)
                         for name, c in self.spec.components.items()}
        self.embeddings = EmbeddingTable(self.repo, self.spec.embeddings, self.tokenizer, self.spec.text_hidden_size)
        self.lora_library = LoraLibrary(self.repo, self.spec.loras)

    def run(self, name: str, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        """One network on arrays given in the spec's input order; its outputs by name."""
        component = self.spec.component(name)
        return self.nets[name].outputs({t.name: a for t, a in zip(component.inputs, arrays)})

    def networks(self, plan: Plan) -> "LocalNetworks":
        """The networks for one request, with the LoRAs its prompts name."""
        return LocalNetworks(self, RequestLoras(self.lora_library, list(plan.loras)), plan.request.tiling,
                             plan.request.vae)

    def other(self, name: str) -> "LocalPipeline":
        """Another model of the repository (a refiner or hires checkpoint), loaded once, on the same engine."""
        if name == self.spec.key:
            return self
        if name not in self.others:
            load_spec(self.repo, name)  # an unknown name: InvalidRequest naming the models there
            threads, backend, precision = self.engine
            self.others[name] = LocalPipeline(self.repo, threads, backend, name, precision)
        return self.others[name]

    def plan(self, request: Txt2ImgRequest, init_image: np.ndarray | None = None, mask: np.ndarray | None = None,
             latent_mask: np.ndarray | None = None, firstpass_image: np.ndarray | None = None,
             control_images: list[np.ndarray | None] | None = None) -> Plan:
        """``control_images``: each ControlNet unit's picture, in the units' order (sdtrt.requests.controlnet)."""
        pictures = {controlnet_image(i): picture for i, picture in enumerate(control_images or [])}
        return plan_request(request, self.spec, init_image, mask, others=lambda name: self.other(name).spec,
                            latent_mask=latent_mask, firstpass_image=firstpass_image, control_pictures=pictures)

    def encode_prompts(self, request: Txt2ImgRequest) -> tuple[Conditioning, Conditioning]:
        """(uncond, cond) of the request's prompts taken as they are (their first step's texts)."""
        plan = self.plan(request)
        request = plan.request
        return self.networks(plan).encode_texts(plan.texts[0], request.clip_skip, request.sdxl_clip_l_skip)

    # --- the jobs --------------------------------------------------------------------------------------------
    def txt2img(self, request: Txt2ImgRequest, on_step: OnStep | None = None,
                firstpass_image: np.ndarray | None = None,
                control_images: list[np.ndarray | None] | None = None) -> Generation:
        return self.generate(self.plan(request, firstpass_image=firstpass_image, control_images=control_images),
                             on_step)

    def img2img(self, request: Img2ImgRequest, init_image: np.ndarray, mask: np.ndarray | None = None,
                on_step: OnStep | None = None, latent_mask: np.ndarray | None = None,
                control_images: list[np.ndarray | None] | None = None) -> Generation:
        return self.generate(self.plan(request, init_image, mask, latent_mask, control_images=control_images),
                             on_step)

    def generate(self, plan: Plan, on_step: OnStep | None = None) -> Generation:
        """A plan run as the served job models run it, with its infotexts."""
        images, seeds = jobs.run(plan, self.networks(plan), on_step,
                                 others=lambda other: self.other(other.spec.key).networks(other))
        return Generation(images, seeds, infotexts(plan))


class LocalNetworks:
    """One request's networks in-process (``sdtrt.pipeline.jobs.Networks``): a network its LoRAs change runs as its LoRA
    variant, with their matrices as two more inputs, exactly as the served job sends them."""

    device = torch.device("cpu")

    def __init__(self, pipeline: LocalPipeline, loras: RequestLoras, tiling: bool = False, vae: str = ""):
        self.pipeline, self.loras, self.tiling, self.vae = pipeline, loras, tiling, vae

    def _run(self, name: str, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        lora = self.loras.inputs(name, len(arrays[0]), self.device)
        variant = self.pipeline.spec.network(name, self.tiling, self.vae)
        if lora is None:
            return self.pipeline.run(variant, *arrays)
        return self.pipeline.run(variant + LORA_SUFFIX, *arrays, *(m.numpy() for m in lora))

    def _single(self, name: str, array: np.ndarray) -> np.ndarray:
        variant = self.pipeline.spec.network(name, self.tiling, self.vae)
        return self.pipeline.run(variant, array)[self.pipeline.spec.component(variant).outputs[0].name]

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: Conditioning) -> torch.Tensor:
        inputs = (sample, timestep, *unet_inputs(self.pipeline.spec, context, sample))
        name = unet_network(context)
        outputs = self._run(name, *(t.numpy() for t in inputs))
        return torch.from_numpy(outputs[self.pipeline.spec.component(name).outputs[0].name])

    def controlnet(self, network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        component = self.pipeline.spec.component(network)
        outputs = self.pipeline.run(network, *(inputs[t.name].numpy() for t in component.inputs))
        return {name: torch.from_numpy(value) for name, value in outputs.items()}

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._single("vae_encoder", images.numpy()))

    def vae_decode(self, latents: torch.Tensor, hypertile: torch.Tensor | None = None) -> np.ndarray:
        if hypertile is None:
            return to_uint8(self._single("vae_decoder", latents.numpy()))
        name = "vae_decoder" + HYPERTILE_SUFFIX
        out = self.pipeline.run(name, latents.numpy(), hypertile.numpy())
        return to_uint8(out[self.pipeline.spec.component(name).outputs[0].name])

    def face_networks(self, restorer: str, weight: float) -> FaceNetworks:
        return face_networks(self.pipeline.spec, restorer, weight, lambda name, arrays: self.pipeline.run(name, *arrays))

    def upscaler(self, name: str) -> ModelUpscaler:
        return model_upscaler(self.pipeline.spec, name, lambda component, arrays: self.pipeline.run(component, *arrays))

    def encode_texts(self, texts: TextPair, clip_skip: int, clip_l_skip: bool = False
                     ) -> tuple[Conditioning, Conditioning]:
        """(uncond, cond) conditioning: contexts [1, 77k, H] with A1111 weighting, chunking, embeddings and Clip
        skip (and SDXL's pooled embeddings)."""
        p = self.pipeline
        rows = piece_rows(p.tokenizer, texts.prompt, texts.negative, p.spec.max_chunks, p.spec.text_hidden_size,
                          p.embeddings, texts.backtrack)
        skip = p.spec.encoder_clip_skip(clip_skip, clip_l_skip)
        outputs = self._run("text_encoder", rows.ids, np.full(len(rows.ids), skip, dtype=np.int32),
                            rows.vectors)
        return prompt_conditioning(outputs, rows.weights, texts.normalize)
