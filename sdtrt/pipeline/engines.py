"""TensorRT engines as an export leaves them: the manifest in a model's spec (``extra["engines"]``) naming each
network's engine file, the GPU and TensorRT it was built for, and the check that this machine matches. Read by the
in-process runner and the exporter (which writes them, ``sdtrt.export.tensorrt``)."""

from __future__ import annotations

import subprocess

from sdtrt.contract.errors import SdtrtError, UsageError
from sdtrt.contract.spec import ENGINES, ModelSpec


def require_tensorrt():
    try:
        # TensorRT only on a GPU install (sdtrt[gpu]): this says so when it is missing
        import tensorrt as trt
    except ImportError:
        raise UsageError(
            "TensorRT is not installed: on a machine with an NVIDIA GPU run `pip install 'sdtrt[gpu]'` "
            "(or use the docker/ image, which has it)"
        ) from None
    return trt


def gpu_name() -> str:
    """The GPU the engines are built for (TensorRT engines only run on the GPU model they were built on)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        out = None
    if out is None or out.returncode != 0 or not out.stdout.strip():
        raise SdtrtError("no NVIDIA GPU found (nvidia-smi failed): TensorRT engines can only be built on a GPU")
    return out.stdout.strip().splitlines()[0]


def manifest(spec: ModelSpec) -> dict[str, dict]:
    if not spec.extra.get(ENGINES):
        raise UsageError(f"{spec.key} has no TensorRT engines; build them with `sdtrt export ... --format trt`")
    return spec.extra[ENGINES]


def check_engine_matches(entry: dict, component: str) -> None:
    """Refuse an engine built for another GPU or TensorRT version, with what to do."""
    trt = require_tensorrt()
    gpu = gpu_name()
    if entry["gpu"] != gpu or entry["tensorrt"] != trt.__version__:
        raise SdtrtError(
            f"the {component} engine was built for {entry['gpu']} with TensorRT {entry['tensorrt']}, but this is "
            f"{gpu} with TensorRT {trt.__version__}: rebuild with `sdtrt export ... --format trt`"
        )
