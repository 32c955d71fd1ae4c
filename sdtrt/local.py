"""The in-process reference runner: txt2img from an exported repository with onnxruntime, no server.

It runs the same steps, in the same order, as the served pipeline (tokenizer -> text encoder -> scheduler
loop with the U-Net -> VAE decoder -> postprocess), so served images can be checked against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sdtrt.denoise import txt2img_latents
from sdtrt.generation import Generation, infotexts
from sdtrt.images import to_uint8
from sdtrt.request import Txt2ImgRequest, resolve_seeds, validate
from sdtrt.spec import ComponentSpec, ModelSpec, load_spec
from sdtrt.prompts import apply_weights, prompt_rows
from sdtrt.text import load_tokenizer


class OnnxNetwork:
    """One exported network in an onnxruntime session, fed and read by the spec's tensor names."""

    def __init__(self, repo: Path, component: ComponentSpec, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.component = component
        self.session = ort.InferenceSession(str(repo / component.onnx), options, providers=["CPUExecutionProvider"])

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        feed = {}
        for spec, array in zip(self.component.inputs, arrays):
            feed[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
        return self.session.run([self.component.outputs[0].name], feed)[0]


class LocalPipeline:
    def __init__(self, repo_dir: str | Path, threads: int = 0):
        self.repo = Path(repo_dir)
        self.spec: ModelSpec = load_spec(self.repo)
        self.tokenizer = load_tokenizer(self.repo / self.spec.tokenizer, self.spec.text_max_length)
        self.text_encoder = OnnxNetwork(self.repo, self.spec.component("text_encoder"), threads)
        self.unet_net = OnnxNetwork(self.repo, self.spec.component("unet"), threads)
        self.vae_decoder = OnnxNetwork(self.repo, self.spec.component("vae_decoder"), threads)

    def encode_prompts(self, request: Txt2ImgRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) U-Net contexts [1, 77k, H] with A1111 weighting, chunking and Clip skip."""
        ids, weights = prompt_rows(self.tokenizer, request.prompt, request.negative_prompt, self.spec.max_chunks)
        embeddings = self.text_encoder(ids, np.full(len(ids), request.clip_skip, dtype=np.int32))
        uncond, cond = torch.from_numpy(apply_weights(embeddings, weights)).split(1)
        return uncond, cond

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.unet_net(sample.numpy(), timestep.numpy(), context.numpy()))

    def decode(self, decoder_latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.vae_decoder(decoder_latents.numpy()))

    def txt2img(self, request: Txt2ImgRequest, on_step: Callable[[int, int], None] | None = None) -> Generation:
        request = validate(request, self.spec)
        request = resolve_seeds(request)
        uncond, cond = self.encode_prompts(request)
        latents, seeds = txt2img_latents(self.spec, request, uncond, cond, self.unet, on_step)
        images = self.decode(latents)
        return Generation(images, seeds, infotexts(request, seeds, self.spec.model_name, self.spec.model_hash))
