"""The engines that run one exported network, apart from the pipeline that calls them (as TensorRT's
demo/Diffusion keeps its engine runner apart from its model descriptors): onnxruntime or OpenVINO on the CPU,
a TensorRT engine on a GPU. Each takes the spec's input arrays by name and gives the outputs by name; the
in-process runner (``sdtrt.pipeline.local``) and the served network models (``model_repository/models/network_model.py``) use
the same ones with the same settings, so the two paths measure and compute the same thing.

CPU settings, measured on 2 cores (benchmarks/cpu_bench.py, RESULTS.md):
  * onnxruntime: full graph optimisation (its default), and idle worker threads that sleep instead of spinning.
    The denoising loop runs between network calls, in this process or another; spinning workers take its core
    (~2x end-to-end latency served, ~20% in-process).
  * OpenVINO: the ``LATENCY`` hint (one stream with every core: a lone request's step as fast as it can be);
    ``fp32`` computes as onnxruntime does (same pictures, about the same speed), ``bf16`` runs the networks in
    bfloat16 where the CPU has it natively (AVX512-BF16, AMX), about 2x faster, as FP16 engines are on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from sdtrt.contract.spec import CPU_ENGINES, CPU_PRECISIONS, ComponentSpec


class Runner(Protocol):
    def outputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _feed(component: ComponentSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t.name: np.ascontiguousarray(feed[t.name], dtype=t.dtype) for t in component.inputs}


class OnnxRuntimeRunner:
    def __init__(self, path: Path, component: ComponentSpec, threads: int = 0, providers: list[str] | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.component = component
        self.names = [t.name for t in component.outputs]
        available = ort.get_available_providers()
        providers = [p for p in providers or ["CPUExecutionProvider"] if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def outputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(self.names, _feed(self.component, feed))))


class OpenVinoRunner:
    def __init__(self, path: Path, component: ComponentSpec, precision: str = "fp32", threads: int = 0,
                 cache_dir: Path | None = None):
        # OpenVINO (a second CPU engine, slow to import) only when it is the one asked for
        import openvino as ov

        if precision not in CPU_PRECISIONS:
            raise ValueError(f"precision must be one of {CPU_PRECISIONS}, got {precision!r}")
        core = ov.Core()
        if cache_dir is not None:  # compiled blobs: the next start loads instead of compiling (cold start)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        # No CPU pinning: several processes (the networks, the loops) share the cores, each busy in turn; pinned
        # threads of one would hold cores the next one needs.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.component = component
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.ports = {t.name: self.compiled.output(t.name) for t in component.outputs}

    def outputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.request.infer(_feed(self.component, feed))  # copies the outputs out (share_outputs=False)
        return {name: np.asarray(result[port]) for name, port in self.ports.items()}


class TensorRtRunner:
    """A built engine (GPU), through polygraphy's runner."""

    def __init__(self, engine_path: Path, component: ComponentSpec):
        # polygraphy and TensorRT only on a GPU install (sdtrt[gpu]): only this runner needs them
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.component = component
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
        self.runner.activate()

    def outputs(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.infer(_feed(self.component, feed))
        return {t.name: np.asarray(out[t.name], dtype=np.float32) for t in self.component.outputs}


def cpu_runner(path: Path, component: ComponentSpec, engine: str = "onnxruntime", precision: str = "fp32",
               threads: int = 0, cache_dir: Path | None = None) -> Runner:
    """The CPU engine ``engine`` on the ONNX file ``path`` (onnxruntime computes in fp32 only)."""
    if engine == "onnxruntime":
        if precision != "fp32":
            raise ValueError(f"onnxruntime runs fp32 only; {precision} needs --cpu-engine openvino")
        return OnnxRuntimeRunner(path, component, threads)
    if engine == "openvino":
        return OpenVinoRunner(path, component, precision, threads, cache_dir)
    raise ValueError(f"CPU engine must be one of {CPU_ENGINES}, got {engine!r}")
