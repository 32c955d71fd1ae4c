"""Triton model ``img2img``: img2img and inpainting, the job users call, planned and run through BLS like
``txt2img`` (tokenizer, text encoder, vae_encoder, the loop on unet, vae_decoder).

Its plan also does the image side (resize mode, mask blur, "only masked" crop), and the run pastes the original
back outside the mask: it returns finished uint8 pictures.
"""

from __future__ import annotations

from sdtrt.contract.spec import IMG2IMG
from sdtrt.model_repository.configs import JOBS
from sdtrt.model_repository.models.job_model import JobModel


class TritonPythonModel(JobModel):
    job = JOBS[IMG2IMG]
