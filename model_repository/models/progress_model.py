"""Triton model ``progress``: each running request's denoising progress, by its Triton request id.

The job loops post ``step``/``total`` and a preview picture here (a few times a second, only for requests that carry
an id); a client that sent a request with an id asks with the id alone and gets the last ones back (-1 and an
empty picture when there are none).
A Triton model rather than a side channel: it works wherever the server is reachable, with Triton's own
protocols, for any number of requests at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.spec import PROGRESS_PREVIEW, PROGRESS_REQUEST_ID, PROGRESS_STEP, PROGRESS_TOTAL
from sdtrt.model_repository.models.triton_io import JsonLog, PerRequestModel, optional_input, scalar

KEEP = 1024  # requests remembered (the oldest go first)
KEEP_SECONDS = 3600.0
NO_PREVIEW = np.zeros((0, 0, 3), np.uint8)
# Anyone who reaches Triton's inference port can post here, so what it holds is bounded: a preview is a grid of
# latent-sized pictures (192 x 192 cells for SDXL's largest size, a few per batch), and all of them together
# stay within a budget (the oldest requests' previews go first).
MAX_PREVIEW_PIXELS = 1024 * 1024
MAX_PREVIEW_BYTES = 64 * 2**20


class TritonPythonModel(PerRequestModel):
    def initialize(self, args):
        self.log = JsonLog(args["model_name"])
        self.seen: OrderedDict[str, tuple[int, int, float, np.ndarray]] = OrderedDict()

    def run(self, request) -> "pb_utils.InferenceResponse":
        key = str(scalar(request, PROGRESS_REQUEST_ID))[:256]
        step, total = optional_input(request, PROGRESS_STEP), optional_input(request, PROGRESS_TOTAL)
        now = time.monotonic()
        if step is not None and total is not None:
            preview = optional_input(request, PROGRESS_PREVIEW)
            if preview is None:  # a post without one keeps the last (the steps between previews)
                preview = self.seen.get(key, (0, 0, 0.0, NO_PREVIEW))[3]
            elif preview.shape[0] * preview.shape[1] > MAX_PREVIEW_PIXELS:
                raise InvalidRequest(PROGRESS_PREVIEW, f"<{preview.shape[1]}x{preview.shape[0]} picture>",
                                     f"at most {MAX_PREVIEW_PIXELS:,} pixels")
            self.seen[key] = (int(step.reshape(-1)[0]), int(total.reshape(-1)[0]), now, preview)
            self.seen.move_to_end(key)
            while len(self.seen) > KEEP or (self.seen and now - next(iter(self.seen.values()))[2] > KEEP_SECONDS):
                self.seen.popitem(last=False)
            self._within_budget()
        done, steps, _, preview = self.seen.get(key, (-1, -1, now, NO_PREVIEW))
        return pb_utils.InferenceResponse([pb_utils.Tensor(PROGRESS_STEP, np.array([done], np.int32)),
                                           pb_utils.Tensor(PROGRESS_TOTAL, np.array([steps], np.int32)),
                                           pb_utils.Tensor(PROGRESS_PREVIEW, preview)])

    def _within_budget(self) -> None:
        """Drop the oldest requests' previews (their steps stay) until all of them fit MAX_PREVIEW_BYTES."""
        held = sum(entry[3].nbytes for entry in self.seen.values())
        for key, (step, total, when, preview) in self.seen.items():
            if held <= MAX_PREVIEW_BYTES:
                return
            if preview.size:
                self.seen[key] = (step, total, when, NO_PREVIEW)
                held -= preview.nbytes
