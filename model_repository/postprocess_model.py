"""Triton model ``postprocess``: VAE output in [-1, 1] -> uint8 images [N, H, W, 3]."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from sdtrt.images import to_uint8
from sdtrt.model_repository.configs import DECODED, IMAGES
from sdtrt.model_repository.triton_io import JsonLog, PerRequestModel


class TritonPythonModel(PerRequestModel):
    def initialize(self, args):
        self.log = JsonLog(args["model_name"])

    def run(self, request) -> "pb_utils.InferenceResponse":
        decoded = pb_utils.get_input_tensor_by_name(request, DECODED).as_numpy()
        return pb_utils.InferenceResponse([pb_utils.Tensor(IMAGES, to_uint8(decoded))])
