"""Triton model ``postprocess``: VAE output in [-1, 1] -> uint8 images [N, H, W, 3]."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from sdtrt.images import to_uint8
from sdtrt.model_repository.configs import DECODED, IMAGES
from sdtrt.model_repository.triton_io import JsonLog, error_response


class TritonPythonModel:
    def initialize(self, args):
        self.log = JsonLog(args["model_name"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                decoded = pb_utils.get_input_tensor_by_name(request, DECODED).as_numpy()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(IMAGES, to_uint8(decoded))]))
            except Exception as exc:
                self.log.error("failed", error=str(exc))
                responses.append(error_response(f"postprocess: {exc}"))
        return responses
