"""Export one descriptor to ONNX, check it with onnx.checker, and compare onnxruntime against torch."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from sdtrt.contract.errors import SdtrtError
from sdtrt.export.networks.descriptors import OPSET, Descriptor

# fp32 onnxruntime vs fp32 torch: differences come from op ordering only (~1e-6 relative).
TOLERANCE = 1e-3


def export_onnx(desc: Descriptor, out_path: Path) -> Path:
    """Write ``out_path`` (and, for models over protobuf's 2 GiB limit, one ``<name>.data`` file beside it)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sample = desc.make_inputs(desc.trace_dims)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        tmp_path = Path(tmp) / out_path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks are expected
            torch.onnx.export(
                desc.module,
                sample,
                str(tmp_path),
                input_names=[t.name for t in desc.inputs],
                output_names=[t.name for t in desc.outputs],
                dynamic_axes=desc.dynamic_axes(),
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter records dynamic shapes as ops, as TensorRT expects
            )
        produced = list(Path(tmp).iterdir())
        if len(produced) == 1:
            shutil.move(str(tmp_path), out_path)
        else:  # large model: the exporter wrote one file per tensor; gather them into one

            model = onnx.load(str(tmp_path), load_external_data=True)
            onnx.save_model(
                model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                location=out_path.name + ".data", size_threshold=1024,
            )
    return out_path


def check_onnx(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GiB with external data


def verify_onnx(desc: Descriptor, path: Path, dims_list: list[dict[str, int]]) -> float:
    """Max abs difference between onnxruntime and the torch module over the given input sizes."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for dims in dims_list:
        torch.manual_seed(0)
        inputs = desc.make_inputs(dims)
        with torch.no_grad():
            expected = desc.module(*inputs)
        expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        feed = {t.name: x.numpy() for t, x in zip(desc.inputs, inputs)}
        actual = session.run([t.name for t in desc.outputs], feed)
        for spec, got, want in zip(desc.outputs, actual, expected):
            if got.shape != want.shape:
                raise SdtrtError(f"{desc.name}: onnxruntime gave {spec.name} shape {got.shape}, torch {want.shape} "
                                 f"at {dims}")
            err = float(np.abs(got - want).max())
            scale = max(1.0, float(np.abs(want).max()))
            if not err <= TOLERANCE * scale:
                raise SdtrtError(f"{desc.name}: onnxruntime's {spec.name} differs from torch by {err:.3g} at {dims} "
                                 f"(allowed {TOLERANCE * scale:.3g})")
            worst = max(worst, err)
    return worst
