"""Triton model ``txt2img``: the text-to-image job users call. The request is read once into its plan, then run
in order through BLS (``sdtrt.pipeline.jobs.run``): the tokenizer and the text encoder once per text pair, the
denoising loop with one call to ``unet`` a step (and the hires fix), the VAE decoder.

One instance runs several requests at once, each loop in its own thread (``job_model.JobModel``); the loops that
denoise at the same time send their steps as one U-Net call (``step_batcher.py``). Each request gets its own scheduler
object, generators and response, so images never cross between requests. Holding the client's request, the
loop sees a cancelled or vanished client at its next step and stops (``CANCELLED``).
"""

from __future__ import annotations

from sdtrt.contract.spec import TXT2IMG
from sdtrt.model_repository.configs import JOBS
from sdtrt.model_repository.models.job_model import JobModel


class TritonPythonModel(JobModel):
    job = JOBS[TXT2IMG]
