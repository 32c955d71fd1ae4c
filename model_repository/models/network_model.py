"""Triton models ``text_encoder``, ``unet``, ``vae_decoder``, ``vae_encoder`` on the Python backend: a CPU engine
(``sdtrt.pipeline.runners``: onnxruntime, or OpenVINO in fp32 or bf16, as the config's ``engine`` and ``precision`` say) on
the exported ONNX.

Used where Triton's own backends are absent (the pip tritonserver) or slower (OpenVINO on a CPU); on NVIDIA's
server image the same networks can be served by ``platform: "onnxruntime_onnx"`` or ``"tensorrt_plan"`` from the
same spec. Requests that
Triton's dynamic batcher gathered are run as ONE onnxruntime call and split back in order, each response going
to the request that sent it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.model_repository.models.metrics import Metrics
from sdtrt.model_repository.models.triton_io import JsonLog, error_response, model_part, model_spec
from sdtrt.contract.spec import CPU_AUTO
from sdtrt.pipeline.runners import OnnxRuntimeRunner, auto_runner, cpu_runner


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.log = JsonLog(args["model_name"])
        spec = model_spec(args)
        self.component = spec.component(model_part(args))
        parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        path = folder / parameters["onnx_file"]
        engine, precision = parameters.get("engine", "onnxruntime"), parameters.get("precision", "fp32")
        if engine == CPU_AUTO:
            engine, precision = self._chosen(spec, path, folder, precision)
        elif engine == "onnxruntime":
            # CUDA when this onnxruntime has it (onnxruntime-gpu on a GPU box), else the CPU.
            self.runner = OnnxRuntimeRunner(path, self.component, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        else:
            self.runner = cpu_runner(path, self.component, engine, precision, cache_dir=_writable(folder / "openvino_cache"))
        self.output_names = [t.name for t in self.component.outputs]
        self.dims = spec.dims
        self.metrics = Metrics()
        self._warm_up(spec)
        self.log.info("ready", onnx=str(path), engine=engine, precision=precision,
                      inputs=[t.name for t in self.component.inputs])

    def _chosen(self, spec, path: Path, folder: Path, precision: str) -> tuple[str, str]:
        """``auto``: the fastest CPU engine for this network on this machine (measured at the first start, then
        read back from ``cpu_engine.json`` beside it; runners.auto_runner)."""
        self.runner, choice = auto_runner(spec, self.component, path, precision,
                                          cache_dir=_writable(folder / "openvino_cache"))
        self.log.info("cpu_engine_chosen", engine=choice.engine, precision=choice.precision, seconds=choice.seconds,
                      refused=choice.refused, measured=choice.measured)
        return choice.engine, choice.precision

    def _warm_up(self, spec) -> None:
        """One run at the smallest shapes: onnxruntime's first run sets up kernels and memory (~1 s)."""
        feed = {}
        for tensor in self.component.inputs:
            feed[tensor.name] = np.ones(spec.smallest_shape(tensor), dtype=tensor.dtype)
        self.runner.outputs(feed)

    def _inputs(self, request) -> list[np.ndarray]:
        arrays = []
        for tensor in self.component.inputs:
            array = pb_utils.get_input_tensor_by_name(request, tensor.name).as_numpy()
            if len(tensor.shape) == 1:  # per-row scalar sent as [N, 1]
                array = array.reshape(-1)
            self._check_shape(tensor, array.shape)
            arrays.append(array.astype(tensor.dtype, copy=False))
        return arrays

    def _check_shape(self, tensor, shape: tuple[int, ...]) -> None:
        """The spec's ranges hold here too, not only in the job models that call this network: Triton's ports
        reach every model, and its config can say "-1" but not "from 8 to 128". (A TensorRT engine's profile
        enforces the same ranges on a GPU.)"""
        if len(shape) != len(tensor.shape):
            raise ValueError(f"input {tensor.name} must have {len(tensor.shape)} dimensions, got shape {list(shape)}")
        for axis, (dim, size) in enumerate(zip(tensor.shape, shape)):
            low, high = (dim, dim) if isinstance(dim, int) else (self.dims[dim].min, self.dims[dim].max)
            if not low <= size <= high:
                raise ValueError(f"input {tensor.name} dimension {axis} ({dim}) must be from {low} to {high}, "
                                 f"got {size} (shape {list(shape)})")

    def execute(self, requests):
        start = time.perf_counter()
        responses: list = [None] * len(requests)
        # Gather requests whose non-batch shapes agree; each group is one onnxruntime call.
        groups: dict[tuple, list[tuple[int, list[np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                arrays = self._inputs(request)
            except Exception as exc:  # a request that does not fit this network: refused, the others still run
                responses[i] = error_response(f"{self.component.name}: {exc}", "INVALID_ARG")
                continue
            key = tuple(a.shape[1:] for a in arrays)
            groups.setdefault(key, []).append((i, arrays))
        for members in groups.values():
            feed = {
                t.name: np.concatenate([arrays[k] for _, arrays in members]) for k, t in enumerate(self.component.inputs)
            }
            try:
                result = self.runner.outputs(feed)
                outputs = [result[name] for name in self.output_names]
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


def _writable(folder: Path) -> Path | None:
    """``folder`` when this process can write there (a read-only repository, e.g. a mounted volume, gets no
    compile cache)."""
    try:
        folder.mkdir(exist_ok=True)
        probe = folder / ".probe"
        probe.touch()
        probe.unlink()
        return folder
    except OSError:
        return None
