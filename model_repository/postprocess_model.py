"""Triton model ``postprocess``: VAE output in [-1, 1] -> uint8 images [N, H, W, 3]."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from sdtrt.images import to_uint8
from sdtrt.model_repository.configs import DECODED, IMAGES
from sdtrt.model_repository.triton_io import JsonLog, PerRequestModel


class TritonPythonModel(PerRequestModel):
    def initialize(self, args):
        import numpy as np

        self.log = JsonLog(args["model_name"])
        to_uint8(np.zeros((1, 3, 8, 8), dtype=np.float32))  # the first call pays for lazy setup

    def run(self, request) -> "pb_utils.InferenceResponse":
        decoded = pb_utils.get_input_tensor_by_name(request, DECODED).as_numpy()
        return pb_utils.InferenceResponse([pb_utils.Tensor(IMAGES, to_uint8(decoded))])
