"""Triton model ``img2img``: img2img and inpainting, the job users call, run through BLS like ``txt2img``
(tokenizer, text encoder, vae_encoder, the loop on unet, vae_decoder).

It also does the image side (resize mode, mask blur, "only masked" crop, pasting the original back outside
the mask) and returns finished uint8 pictures.
"""

from __future__ import annotations

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.contract.spec import IMAGES, IMG2IMG, INIT_IMAGE, MASK, SEEDS
from sdtrt.model_repository.configs import JOBS
from sdtrt.model_repository.models.triton_io import JobModel, optional_input
from sdtrt.pipeline.jobs import encode_prompts, img2img_latents
from sdtrt.requests.img2img import finish_images, prepare_images


class TritonPythonModel(JobModel):
    job = JOBS[IMG2IMG]

    def run(self, request) -> "pb_utils.InferenceResponse":
        start = time.perf_counter()
        spec, settings = self.settings(request)
        init_image, mask = optional_input(request, INIT_IMAGE), optional_input(request, MASK)
        inputs = prepare_images(init_image, mask, settings, spec.vae_scale_factor)
        nets = self.networks(request, spec, settings)
        with self.stage("text"):
            prompts = encode_prompts(settings, nets)
        with self.stage("denoise"), self.batcher.denoising():
            latents, seeds = img2img_latents(spec, settings, inputs, prompts, nets, self.on_step)
        with self.stage("decode"):
            images = finish_images(nets.vae_decode(latents), inputs, spec.vae_scale_factor)
        self.done(request, spec, settings, start, inpaint=mask is not None)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(IMAGES, images), pb_utils.Tensor(SEEDS, np.array(seeds, dtype=np.int64)),
        ])
