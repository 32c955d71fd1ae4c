"""Triton models ``text_encoder``, ``unet``, ``vae_decoder`` on the Python backend: onnxruntime on the exported ONNX.

Used where Triton's own onnxruntime backend is absent (the pip tritonserver); on NVIDIA's server image the same
networks are served by ``platform: "onnxruntime_onnx"`` or ``"tensorrt_plan"`` from the same spec. Requests that
Triton's dynamic batcher gathered are run as ONE onnxruntime call and split back in order, each response going
to the request that sent it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from sdtrt.model_repository.metrics import Metrics
from sdtrt.model_repository.triton_io import JsonLog, error_response, model_part, model_spec


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.log = JsonLog(args["model_name"])
        spec = model_spec(args)
        self.component = spec.component(model_part(args))
        onnx_file = config["parameters"]["onnx_file"]["string_value"]
        path = Path(args["model_repository"]) / args["model_version"] / onnx_file
        # CUDA when this onnxruntime has it (onnxruntime-gpu on a GPU box), else the CPU.
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        options = ort.SessionOptions()
        # Idle worker threads must sleep, not spin: the scheduler loops run in other processes between U-Net
        # calls and need those cores (spinning cost ~2x end-to-end latency on a 2-core machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.output_names = [t.name for t in self.component.outputs]
        self.metrics = Metrics()
        self._warm_up(spec)
        self.log.info("ready", onnx=str(path), inputs=[t.name for t in self.component.inputs])

    def _warm_up(self, spec) -> None:
        """One run at the smallest shapes: onnxruntime's first run sets up kernels and memory (~1 s)."""
        feed = {}
        for tensor in self.component.inputs:
            shape = [d if isinstance(d, int) else spec.dims[d].min for d in tensor.shape]
            feed[tensor.name] = np.ones(shape, dtype=tensor.dtype)
        self.session.run(self.output_names, feed)

    def _inputs(self, request) -> list[np.ndarray]:
        arrays = []
        for tensor in self.component.inputs:
            array = pb_utils.get_input_tensor_by_name(request, tensor.name).as_numpy()
            if len(tensor.shape) == 1:  # per-row scalar sent as [N, 1]
                array = array.reshape(-1)
            arrays.append(array.astype(tensor.dtype, copy=False))
        return arrays

    def execute(self, requests):
        start = time.perf_counter()
        responses: list = [None] * len(requests)
        # Gather requests whose non-batch shapes agree; each group is one onnxruntime call.
        groups: dict[tuple, list[tuple[int, list[np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                arrays = self._inputs(request)
            except Exception as exc:
                responses[i] = error_response(f"{self.component.name}: {exc}")
                continue
            key = tuple(a.shape[1:] for a in arrays)
            groups.setdefault(key, []).append((i, arrays))
        for members in groups.values():
            feed = {
                t.name: np.concatenate([arrays[k] for _, arrays in members]) for k, t in enumerate(self.component.inputs)
            }
            try:
                outputs = self.session.run(self.output_names, feed)
            except Exception as exc:
                self.log.error("run_failed", error=str(exc), shapes={k: list(v.shape) for k, v in feed.items()})
                for i, _ in members:
                    responses[i] = error_response(f"{self.component.name}: {exc}")
                continue
            self.metrics.batch(self.component.name, int(outputs[0].shape[0]), len(members))
            offset = 0
            for i, arrays in members:
                n = arrays[0].shape[0]
                tensors = [pb_utils.Tensor(name, out[offset:offset + n]) for name, out in zip(self.output_names, outputs)]
                responses[i] = pb_utils.InferenceResponse(tensors)
                offset += n
        rows = sum(arrays[0].shape[0] for members in groups.values() for _, arrays in members)
        self.log.verbose("batch", requests=len(requests), groups=len(groups), rows=rows,
                         ms=round(1000 * (time.perf_counter() - start), 2))
        return responses
