"""Triton model ``scheduler``: txt2img's denoising loop (and hires fix), one BLS call to ``unet`` per step.

Each instance runs one request's loop at a time; several instances (``instance_group``) run several loops,
and Triton's dynamic batcher on ``unet`` merges their steps into shared U-Net calls. Each request gets its
own scheduler object, generators and response, so images never cross between requests.
"""

from __future__ import annotations

import time

import torch
import triton_python_backend_utils as pb_utils

from sdtrt.jobs import txt2img_latents
from sdtrt.model_repository.configs import DECODER_LATENTS, JOBS, PIPELINE, SEEDS
from sdtrt.model_repository.triton_io import JobModel


class TritonPythonModel(JobModel):
    job = JOBS[PIPELINE]

    def run(self, request) -> "pb_utils.InferenceResponse":
        start = time.perf_counter()
        settings = self.settings(request)
        uncond, cond = self.conditioning(request)
        latents, seeds = txt2img_latents(self.spec, settings, uncond, cond, self.networks(request))
        self.done(request, settings, start)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(DECODER_LATENTS, latents.cpu().numpy()),
            pb_utils.Tensor(SEEDS, torch.tensor(seeds, dtype=torch.int64).numpy()),
        ])
