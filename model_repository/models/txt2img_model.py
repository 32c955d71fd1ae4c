"""Triton model ``txt2img``: the text-to-image job users call, run in order through BLS: the tokenizer, the text
encoder, the denoising loop with one call to ``unet`` a step (and the hires fix), the VAE decoder.

One instance runs several requests at once, each loop in its own thread (``triton_io.JobModel``); the loops that
denoise at the same time send their steps as one U-Net call (``step_batcher.py``). Each request gets its own scheduler
object, generators and response, so images never cross between requests. Holding the client's request, the
loop sees a cancelled or vanished client at its next step and stops (``CANCELLED``).
"""

from __future__ import annotations

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.contract.spec import IMAGES, SEEDS, TXT2IMG
from sdtrt.model_repository.configs import JOBS
from sdtrt.model_repository.models.triton_io import JobModel
from sdtrt.pipeline.jobs import encode_prompts, txt2img_latents


class TritonPythonModel(JobModel):
    job = JOBS[TXT2IMG]

    def run(self, request) -> "pb_utils.InferenceResponse":
        start = time.perf_counter()
        spec, settings = self.settings(request)
        nets = self.networks(request, spec, settings)
        with self.stage("text"):
            prompts = encode_prompts(settings, nets)
        with self.stage("denoise"), self.batcher.denoising():
            latents, seeds = txt2img_latents(spec, settings, prompts, nets, self.on_step)
        with self.stage("decode"):
            images = nets.vae_decode(latents)
        self.done(request, spec, settings, start)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(IMAGES, images), pb_utils.Tensor(SEEDS, np.array(seeds, dtype=np.int64)),
        ])
