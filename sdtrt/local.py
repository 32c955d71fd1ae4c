"""The in-process reference runner: txt2img and img2img from an exported repository with onnxruntime, no server.

It runs the same steps, in the same order, as the served job models (tokenizer -> text encoder -> the denoising
loop with the U-Net -> VAE decoder -> uint8 pictures), so served images can be checked against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdtrt.generation import Generation, infotexts
from sdtrt.images import to_uint8
from sdtrt.img2img import finish_images, prepare_images
from sdtrt.jobs import OnStep, img2img_latents, txt2img_latents
from sdtrt.extra_networks import LORA_SUFFIX, EmbeddingTable, LoraLibrary, RequestLoras, request_loras
from sdtrt.conditioning import Conditioning, prompt_conditioning, unet_inputs
from sdtrt.prompts import text_rows
from sdtrt.request import Img2ImgRequest, Txt2ImgRequest, resolve_seeds, validate
from sdtrt.spec import ComponentSpec, ModelSpec, load_spec
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
        return self.outputs(*arrays)[self.component.outputs[0].name]

    def outputs(self, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        feed = {}
        for spec, array in zip(self.component.inputs, arrays):
            feed[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
        names = [t.name for t in self.component.outputs]
        return dict(zip(names, self.session.run(names, feed)))


class TrtNetwork:
    """One network as a TensorRT engine (GPU), through polygraphy's runner; same calling convention."""

    def __init__(self, engine_path: Path, component: ComponentSpec):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.component = component
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
        self.runner.activate()

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self.outputs(*arrays)[self.component.outputs[0].name]

    def outputs(self, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        feed = {t.name: np.ascontiguousarray(a, dtype=t.dtype) for t, a in zip(self.component.inputs, arrays)}
        out = self.runner.infer(feed)
        return {t.name: np.asarray(out[t.name], dtype=np.float32) for t in self.component.outputs}


BACKENDS = ("onnxruntime", "tensorrt")


class LocalPipeline:
    device = torch.device("cpu")  # the loop's tensors; the networks take and give NumPy arrays

    def __init__(self, repo_dir: str | Path, threads: int = 0, backend: str = "onnxruntime", model: str | None = None):
        """One model of an exported repository (``model``; default: its default model)."""
        self.repo = Path(repo_dir)
        self.spec: ModelSpec = load_spec(self.repo, model)
        self.tokenizer = load_tokenizer(self.repo / self.spec.tokenizer, self.spec.text_max_length)
        if backend == "tensorrt":
            from sdtrt.engines import check_engine_matches, manifest

            engines = manifest(self.spec)
            self.nets = {}
            for name, component in self.spec.components.items():
                check_engine_matches(engines[name], name)
                path = self.repo / self.spec.triton_name(name) / "1" / engines[name]["file"]
                self.nets[name] = TrtNetwork(path, component)
        else:
            self.nets = {name: OnnxNetwork(self.repo, c, threads) for name, c in self.spec.components.items()}
        self.embeddings = EmbeddingTable(self.repo, self.spec.embeddings, self.tokenizer, self.spec.text_hidden_size)
        self.lora_library = LoraLibrary(self.repo, self.spec.loras)

    def networks(self, request: Txt2ImgRequest) -> "LocalNetworks":
        """The networks for one request, with the LoRAs its prompts name."""
        tags = request_loras(request.prompt, request.negative_prompt, self.spec.loras, 1 << 30)  # checked by validate
        return LocalNetworks(self, RequestLoras(self.lora_library, tags))

    def encode_prompts(self, request: Txt2ImgRequest) -> tuple[Conditioning, Conditioning]:
        return self.networks(request).encode_prompts(request)

    # --- the jobs --------------------------------------------------------------------------------------------
    def txt2img(self, request: Txt2ImgRequest, on_step: OnStep | None = None) -> Generation:
        request = resolve_seeds(validate(request, self.spec))
        nets = self.networks(request)
        uncond, cond = nets.encode_prompts(request)
        latents, seeds = txt2img_latents(self.spec, request, uncond, cond, nets, on_step)
        return Generation(nets.vae_decode(latents), seeds, self._infotexts(request, seeds))

    def img2img(self, request: Img2ImgRequest, init_image: np.ndarray, mask: np.ndarray | None = None,
                on_step: OnStep | None = None) -> Generation:
        request = resolve_seeds(validate(request, self.spec))
        inputs = prepare_images(init_image, mask, width=request.width, height=request.height,
                                resize_mode=request.resize_mode, mask_blur=request.mask_blur,
                                inpaint_full_res=request.inpaint_full_res,
                                padding=request.inpaint_full_res_padding, vae_scale_factor=self.spec.vae_scale_factor)
        nets = self.networks(request)
        uncond, cond = nets.encode_prompts(request)
        latents, seeds = img2img_latents(self.spec, request, inputs, uncond, cond, nets, on_step)
        images = finish_images(nets.vae_decode(latents), inputs, self.spec.vae_scale_factor)
        return Generation(images, seeds, self._infotexts(request, seeds, mask is not None))

    def _infotexts(self, request: Txt2ImgRequest, seeds: list[int], inpaint: bool = False) -> list[str]:
        return infotexts(request, seeds, self.spec, inpaint)


class LocalNetworks:
    """One request's networks in-process (``sdtrt.jobs.Networks``): a network its LoRAs change runs as its LoRA
    variant, with their matrices as two more inputs, exactly as the served job sends them."""

    device = torch.device("cpu")

    def __init__(self, pipeline: LocalPipeline, loras: RequestLoras):
        self.pipeline, self.loras = pipeline, loras

    def _run(self, name: str, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        lora = self.loras.inputs(name, len(arrays[0]), self.device)
        if lora is None:
            return self.pipeline.nets[name].outputs(*arrays)
        return self.pipeline.nets[name + LORA_SUFFIX].outputs(*arrays, *(m.numpy() for m in lora))

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: Conditioning) -> torch.Tensor:
        inputs = (sample, timestep, *unet_inputs(self.pipeline.spec, context))
        outputs = self._run("unet", *(t.numpy() for t in inputs))
        return torch.from_numpy(outputs[self.pipeline.spec.component("unet").outputs[0].name])

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.pipeline.nets["vae_encoder"](images.numpy()))

    def vae_decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.pipeline.nets["vae_decoder"](latents.numpy()))

    def encode_prompts(self, request: Txt2ImgRequest) -> tuple[Conditioning, Conditioning]:
        """(uncond, cond) conditioning: contexts [1, 77k, H] with A1111 weighting, chunking, embeddings and Clip
        skip (and SDXL's pooled embeddings)."""
        p = self.pipeline
        rows = text_rows(p.tokenizer, request.prompt, request.negative_prompt, p.spec.max_chunks,
                         p.spec.text_hidden_size, p.embeddings)
        outputs = self._run("text_encoder", rows.ids, np.full(len(rows.ids), request.clip_skip, dtype=np.int32),
                            rows.vectors)
        return prompt_conditioning(outputs, rows.weights)
