"""The networks as the jobs see them (``sdtrt.jobs.Networks``), served: BLS calls to the Triton network models.

Each call names the spec's tensors; Triton's dynamic batcher may merge it with calls from other requests.
A cancelled request stops at its next network call.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from sdtrt.images import to_uint8
from sdtrt.spec import ComponentSpec, ModelSpec


class Cancelled(Exception):
    pass


class BlsNetworks:
    def __init__(self, spec: ModelSpec, request):
        self.spec = spec
        self.request = request

    def _call(self, component: ComponentSpec, *arrays: np.ndarray) -> np.ndarray:
        if self.request.is_cancelled():
            raise Cancelled()
        inputs = []
        for tensor, array in zip(component.inputs, arrays):
            if len(tensor.shape) == 1:  # per-row scalars travel as [N, 1] (Triton needs a non-batch dim)
                array = array.reshape(-1, 1)
            inputs.append(pb_utils.Tensor(tensor.name, np.ascontiguousarray(array, dtype=tensor.dtype)))
        output = component.outputs[0].name
        response = pb_utils.InferenceRequest(
            model_name=component.name, requested_output_names=[output], inputs=inputs
        ).exec()
        if response.has_error():
            raise RuntimeError(f"{component.name}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy().copy()

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._call(self.spec.component("unet"), sample.numpy(), timestep.numpy(), context.numpy()))

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._call(self.spec.component("vae_encoder"), images.numpy()))

    def vae_decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self._call(self.spec.component("vae_decoder"), latents.numpy()))
