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
    ``fp32`` computes as onnxruntime does (same pictures), ``bf16`` runs the networks in bfloat16 where the CPU has
    it natively (AVX512-BF16, AMX), about 2x faster, as FP16 engines are on a GPU.
  * Which fp32 engine is faster depends on the CPU (the same benchmark gave onnxruntime ~= PyTorch on a Xeon, and
    OpenVINO ahead of both on an EPYC): the served default (``auto``) measures them on the machine, per network, at
    its first start (``choose_cpu_engine``) and keeps the choice beside the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from sdtrt.contract.spec import CPU_CHOICE_FILE, CPU_ENGINES, CPU_FAST_ENV, CPU_PRECISIONS, ComponentSpec, ModelSpec


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


# --- the CPU engine picked by measurement (``auto``) ------------------------------------------------------------

# An fp32 engine must give onnxruntime's outputs (the pictures' reference) within this, relative to their scale:
# OpenVINO's f32 is ~1e-6 off; a candidate further off is not chosen, whatever its speed.
FP32_AGREEMENT = 1e-3
CHOICE_FORMAT = 1  # the choice file's layout; another one is measured again


def cpu_description() -> tuple[str, list[str]]:
    """This CPU's model name and the features the engines' speed depends on."""
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == (platform.processor() or platform.machine()):
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (elsewhere OpenVINO's bf16 is emulated: slower, not faster)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_description()[1]))


def auto_candidates(bf16: bool) -> list[tuple[str, str]]:
    """The (engine, precision) pairs ``auto`` measures: the fp32 engines, and OpenVINO bf16 when bf16 is asked for
    (``sdtrt serve --fast``) and the CPU has it natively."""
    fp32 = [("onnxruntime", "fp32"), ("openvino", "fp32")]
    return [("openvino", "bf16"), *fp32] if bf16 and cpu_has_bf16() else fp32


def typical_feed(spec: ModelSpec, component: ComponentSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the export's optimal shapes: floats from a fixed seed, integers 1 (valid token ids and counts)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for tensor in component.inputs:
        shape = spec.typical_shape(tensor)
        if np.issubdtype(np.dtype(tensor.dtype), np.floating):
            feed[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
        else:
            feed[tensor.name] = np.ones(shape, dtype=tensor.dtype)
    return feed


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    precision: str
    seconds: dict[str, float]  # "engine precision" -> median seconds per call at the typical shapes
    refused: dict[str, str] = field(default_factory=dict)  # candidates not chosen whatever their speed, and why
    measured: bool = True  # False: read back from the choice file of an earlier start

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision}"


def _choice_key(path: Path, feed: dict[str, np.ndarray], candidates: list[tuple[str, str]], threads: int) -> dict:
    stat = path.stat()
    return {"format": CHOICE_FORMAT, "cpu": cpu_description()[0], "cores": os.cpu_count(), "threads": threads,
            "onnx": [stat.st_size, stat.st_mtime_ns], "shapes": {k: list(v.shape) for k, v in feed.items()},
            "candidates": [" ".join(c) for c in candidates]}


def _agrees(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str:
    """'' when ``got`` matches ``want`` within FP32_AGREEMENT, else how far off it is."""
    for name, value in want.items():
        scale = max(1.0, float(np.abs(value).max()))
        error = float(np.abs(got[name].astype(np.float64) - value).max())
        if not error <= FP32_AGREEMENT * scale:
            return f"{name} off onnxruntime's by {error:.3g} (allowed {FP32_AGREEMENT * scale:.3g})"
    return ""


def choose_cpu_engine(path: Path, component: ComponentSpec, feed: dict[str, np.ndarray],
                      candidates: list[tuple[str, str]], record: Path | None = None, threads: int = 0,
                      cache_dir: Path | None = None, repeats: int = 2) -> tuple["Runner", EngineChoice]:
    """The fastest candidate on this machine for the network ``path``, measured on ``feed`` (the best of
    ``repeats`` calls each, after one untimed: the first start of an SD 1.5 export on a CPU takes a minute or two
    more); fp32 candidates must agree with onnxruntime (the first candidate that is it). The choice is kept in
    ``record`` (written by a temporary name and a rename) and read back while this CPU, the ONNX file, the shapes
    and the candidates stay the same; networks measuring at once take turns (a lock beside ``record``'s model
    folder), so that one's timing is not another's load. Returns the chosen runner, built once."""
    def make(engine: str, precision: str) -> Runner:
        return cpu_runner(path, component, engine, precision, threads, cache_dir)

    key = _choice_key(path, feed, candidates, threads)
    with _measuring_lock(record):
        return _choose(make, key, feed, candidates, record, repeats)


def auto_runner(spec: ModelSpec, component: ComponentSpec, path: Path, precision: str = "fp32", threads: int = 0,
                cache_dir: Path | None = None) -> tuple["Runner", EngineChoice]:
    """``auto`` for one exported network: its choice kept beside its ONNX (``CPU_CHOICE_FILE``), measured at the
    export's optimal shapes, with bf16 candidates when ``precision`` or `sdtrt serve --fast` (``CPU_FAST_ENV``)
    asks for them. The served network, the loop's in-process networks and LocalPipeline share this choice."""
    bf16 = precision == "bf16" or os.environ.get(CPU_FAST_ENV, "") == "1"
    return choose_cpu_engine(path, component, typical_feed(spec, component), auto_candidates(bf16),
                             path.parent / CPU_CHOICE_FILE, threads, cache_dir)


@contextlib.contextmanager
def _measuring_lock(record: Path | None):
    """One measurement at a time among the networks of a repository (its folder: ``record``'s grandparent's
    parent, i.e. REPO/<model>/<version>/cpu_engine.json -> REPO)."""
    if record is None:
        yield
        return
    # fcntl: POSIX only, as the server is
    import fcntl

    lock = record.parent.parent.parent / ".cpu-engine.lock"
    try:
        handle = open(lock, "a")
    except OSError:  # a read-only repository: nothing is written, nothing to take turns for
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _choose(make, key: dict, feed: dict[str, np.ndarray], candidates: list[tuple[str, str]], record: Path | None,
            repeats: int) -> tuple["Runner", EngineChoice]:
    if record is not None and record.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            kept = json.loads(record.read_text())
            if kept["key"] == key:
                choice = EngineChoice(**{**kept["choice"], "measured": False})
                return make(choice.engine, choice.precision), choice
    # In this process: a child forked from a Triton stub (a threaded process) hung measuring in the demo's server,
    # so the losers' memory (their arenas at the measured shapes) may stay until the allocator hands it back.
    measured = _measure(make, feed, candidates, repeats)
    seconds, refused = measured["seconds"], measured["refused"]
    engine, precision = min(seconds, key=seconds.get).split(" ")
    choice = EngineChoice(engine, precision, seconds, refused)
    if record is not None:
        with contextlib.suppress(OSError):  # a read-only repository measures at every start
            partial = record.with_name(record.name + ".partial")
            kept = asdict(choice)
            kept.pop("measured")
            partial.write_text(json.dumps({"key": key, "choice": kept}, indent=1))
            partial.replace(record)
    return make(engine, precision), choice


def _measure(make, feed: dict[str, np.ndarray], candidates: list[tuple[str, str]], repeats: int) -> dict:
    seconds, refused, reference = {}, {}, None
    for engine, precision in candidates:
        runner = make(engine, precision)
        outputs = runner.outputs(feed)
        if engine == "onnxruntime" and reference is None:
            reference = outputs
        elif precision == "fp32" and reference is not None and (why := _agrees(outputs, reference)):
            refused[f"{engine} {precision}"] = why
            continue
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.outputs(feed)
            times.append(time.perf_counter() - start)
        seconds[f"{engine} {precision}"] = round(min(times), 6)
        del runner  # (before the next candidate loads)
    return {"seconds": seconds, "refused": refused}
