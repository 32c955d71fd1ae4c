"""The networks a denoising loop calls every step (the U-Net and its variants, the ControlNets), run inside the job
model's own process instead of through a BLS call to their Triton models (``--loop-networks in-process``).

A served step otherwise pays a round trip: the job's stub hands its tensors to Triton, Triton queues them for the
U-Net model's stub, and the answer comes back the same way. Here the step's call goes straight to the same CPU
engine the U-Net model would run (the same ONNX, the same ``--cpu-engine``; ``auto`` reads or makes the same
measured choice, ``cpu_engine.json`` beside the network), on the loops' merged rows (the step batcher still merges
the loops of this instance). The networks stay Triton models for every other caller; the text encoder and the VAE
(once per request) are still called through BLS. What it costs: each job instance holds its own copy of the
networks it runs (an SD 1.5 U-Net is 3.4 GB in fp32), which is why it is asked for, not the default.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from sdtrt.contract.spec import CPU_AUTO, ComponentSpec, ModelSpec
from sdtrt.pipeline.runners import Runner, auto_runner, cpu_runner

STEP_NETWORKS = ("unet", "controlnet")  # the components (by name prefix) a loop calls every step


class LoopNetworks:
    """Per (model, network): a CPU engine on its ONNX, built on first use, one call at a time (an OpenVINO infer
    request is not thread-safe; the loops' calls are merged before they get here anyway)."""

    def __init__(self, repo: Path, engine: str, precision: str):
        self.repo, self.engine, self.precision = repo, engine, precision
        self._runners: dict[tuple[str, str], tuple[Runner, threading.Lock]] = {}
        self._guard = threading.Lock()
        self.chosen: dict[str, str] = {}  # network -> "engine precision", for the job's log

    @staticmethod
    def runs(component: ComponentSpec) -> bool:
        return component.name.startswith(STEP_NETWORKS)

    def _runner(self, spec: ModelSpec, component: ComponentSpec) -> tuple[Runner, threading.Lock]:
        key = (spec.key, component.name)
        with self._guard:
            if key not in self._runners:
                path = self.repo / component.onnx
                cache = path.parent / "openvino_cache"
                cache = cache if cache.is_dir() else None
                if self.engine == CPU_AUTO:
                    runner, choice = auto_runner(spec, component, path, self.precision, cache_dir=cache)
                    self.chosen[spec.triton_name(component.name)] = choice.label
                else:
                    runner = cpu_runner(path, component, self.engine, self.precision, cache_dir=cache)
                    self.chosen[spec.triton_name(component.name)] = f"{self.engine} {self.precision}"
                self._runners[key] = (runner, threading.Lock())
            return self._runners[key]

    def run(self, spec: ModelSpec, component: ComponentSpec, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One call on the rows the loops sent (per-row scalars as BLS sends them, [N, 1], or [N])."""
        runner, lock = self._runner(spec, component)
        feed = {}
        for tensor, value in zip(component.inputs, tensors):
            array = value.detach().cpu().numpy()
            feed[tensor.name] = np.ascontiguousarray(array.reshape(-1) if len(tensor.shape) == 1 else array)
        with lock:
            outputs = runner.outputs(feed)
        return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in outputs.items()}
