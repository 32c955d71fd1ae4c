"""Start, health-check and stop a real ``tritonserver`` on a model repository.

On a machine without NVIDIA's container, the server is the one shipped in the ``nvidia-pytriton`` wheel
(Triton 2.51, Python backend only), which the Python-backend models here are written for. Elsewhere, pass
``binary=`` (``--tritonserver``) or set ``SDTRT_TRITONSERVER``, e.g. ``/opt/tritonserver/bin/tritonserver``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from sdtrt.contract.errors import SdtrtError, UsageError
from sdtrt.contract.prometheus import samples, scrape
from sdtrt.contract.spec import DEFAULT_PORTS, IMG2IMG, SPEC_FILENAME, TXT2IMG
from sdtrt.model_repository.serving.control import ControlKey, resolve_key
from sdtrt.pipeline.clip_vocab import cache_dir

log = logging.getLogger("sdtrt.server")

STDOUT = "-"  # as log_file: tritonserver's log goes to this process's stdout


def _terminate_with_parent() -> None:
    """In the child, before exec: have Linux send it SIGTERM if this process dies, even by SIGKILL, so that a
    killed `sdtrt serve` (or test run) never leaves a tritonserver and its stubs behind."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pytriton_home() -> Path | None:
    try:
        # the pytriton wheel (tritonserver without Docker) is optional: a container has tritonserver itself
        import pytriton
    except ImportError:
        return None
    home = Path(pytriton.__file__).parent / "tritonserver"
    return home if (home / "bin" / "tritonserver").is_file() else None


def ensure_python_stub(home: Path) -> None:
    """The wheel ships one Python-backend stub per Python version; the backend loads the one beside it."""
    stub = home / "backends" / "python" / "triton_python_backend_stub"
    if stub.is_file():
        return
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.is_file():
        raise SdtrtError(f"nvidia-pytriton has no Python-backend stub for Python {version} ({source})")
    shutil.copy2(source, stub)


@dataclass
class TritonServer:
    model_repository: Path
    http_port: int = DEFAULT_PORTS["http"]
    grpc_port: int = DEFAULT_PORTS["grpc"]
    metrics_port: int = DEFAULT_PORTS["metrics"]
    log_file: Path | None = None
    binary: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    # On SIGTERM Triton refuses new requests and lets those in flight finish for up to this long (a scale-in's
    # pod keeps serving its running generations); stop() waits that long before it kills.
    drain_timeout: float = 30.0
    # The key Triton's control APIs want (sdtrt.model_repository.serving.control); None: resolved when the command is built.
    control_key: ControlKey | None = None
    process: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        if self.control_key is None:
            self.control_key = resolve_key(create=True)
        env = dict(os.environ)
        binary = self.binary or (Path(os.environ["SDTRT_TRITONSERVER"]) if os.environ.get("SDTRT_TRITONSERVER") else None)
        args: list[str] = []
        if binary is None:
            home = pytriton_home()
            if home is None:
                raise UsageError(
                    "no tritonserver found: install sdtrt's dependencies (scripts/setup.sh), or pass "
                    "--tritonserver /path/to/tritonserver (or set SDTRT_TRITONSERVER)"
                )
            ensure_python_stub(home)
            binary = home / "bin" / "tritonserver"
            # The wheel's server has no GPU support: its GPU metrics would only log errors.
            args += [f"--backend-directory={home / 'backends'}", f"--cache-directory={home / 'caches'}",
                     "--allow-gpu-metrics=false"]
            # The stub embeds libpython: point it at this interpreter's, and put this environment first on
            # PATH so that the models import this environment's packages (sdtrt, onnxruntime, diffusers).
            libdir = sysconfig.get_config_var("LIBDIR") or ""
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        args = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            # Explicit model control (every model loaded at start) lets the healer unload and reload one model
            # whose stub died; see model_repository/health.py.
            "--model-control-mode=explicit",
            "--load-model=*",
            # The configs are generated whole (model_repository/configs.py): without this, the Python backend
            # starts one extra stub per model only to ask it for config changes, which imports torch and
            # diffusers for each job model once more before its instance starts (~4 s of a cold start).
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={max(1, int(self.drain_timeout))}",
            # Model loading (which runs code the caller sends), shared memory, logging and trace only for
            # requests with the control key; inference, health and metadata stay open (sdtrt.model_repository.serving.control).
            *self.control_key.triton_args(),
            *args,
            *self.extra_args,
        ]
        return args, env

    def start(self, timeout: float = 180.0) -> "TritonServer":
        repo = Path(self.model_repository)
        if not (repo / SPEC_FILENAME).is_file():
            raise UsageError(
                f"--model-repository {str(repo)!r} is not an sdtrt export (no {SPEC_FILENAME}); "
                f"run `sdtrt export MODEL_DIR --out {repo}` first"
            )
        args, env = self.command()
        to_stdout = str(self.log_file) == STDOUT  # containers: the log goes where the runtime collects it
        log_path = None if to_stdout else Path(self.log_file or repo.parent / f"tritonserver-{self.http_port}.log")
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = log_path
        shown = " ".join(args).replace(self.control_key.value, "<control key>")
        log.info("starting %s (log: %s)", shown, log_path or "stdout")
        with open(log_path, "ab") if log_path is not None else contextlib.nullcontext(None) as out:
            # Own process group: stopping it also reaps the Python-backend stubs, never leaving orphans.
            self.process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                            start_new_session=True, preexec_fn=_terminate_with_parent)
        self.wait_ready(timeout)
        return self

    @property
    def url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Its Prometheus metrics, as this host reaches them (loopback when it listens on every interface)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.metrics_port}/metrics"

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SdtrtError(f"tritonserver exited with code {self.process.returncode} while starting:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise SdtrtError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_file is None or str(self.log_file) == STDOUT or not Path(self.log_file).exists():
            return ""
        return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])

    def requests_in_flight(self) -> float | None:
        """Generations this server is running or has queued (sdtrt_requests_running plus Triton's pending count
        of the job models, from its own metrics); None when the metrics cannot be read."""
        try:
            text = scrape(self.metrics_url)
        except OSError:
            return None
        jobs = {f'model="{job}"' for job in (TXT2IMG, IMG2IMG)}
        return sum(value for name, labels, value in samples(text)
                   if name == "sdtrt_requests_running"
                   or (name == "nv_inference_pending_request_count" and jobs & set(labels.split(","))))

    def drain(self, timeout: float | None = None) -> float:
        """Wait (up to ``timeout``, default the drain timeout) until no generation is running or queued, so that
        stopping loses none: Triton refuses every new inference once it is told to stop, the U-Net calls of a
        generation under way included. Returns what was still in flight at the end (0: drained)."""
        deadline = time.monotonic() + (self.drain_timeout if timeout is None else timeout)
        while True:
            left = self.requests_in_flight()
            if not left or time.monotonic() >= deadline:  # (None: no metrics to wait on)
                return left or 0.0
            time.sleep(0.5)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton then refuses new requests, finishes those in flight, unloads models and exits),
        SIGKILL after ``timeout`` (default: the drain timeout and some); then reap the group."""
        timeout = self.drain_timeout + 15.0 if timeout is None else timeout
        if self.process is None:
            return None
        proc, self.process = self.process, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                proc.kill()
                proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any stub still alive in the group
        except ProcessLookupError:
            pass
        return proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def perf_analyzer_command(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The perf_analyzer binary from the tritonclient wheel, with the two shared libraries it needs.

    It links libb64.so.0d and libcudart.so.12; the nvidia-pytriton wheel bundles both under hashed names,
    so we link them under their real names in a cache folder put on LD_LIBRARY_PATH.
    """
    binary = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(binary).is_file():
        raise UsageError("perf_analyzer not found: it comes with tritonclient[all]==2.50.0 (scripts/setup.sh)")
    env = dict(os.environ)
    home = pytriton_home()
    libs = home.parent.parent / "nvidia_pytriton.libs" if home else Path("/nonexistent")
    links = cache_dir() / "perf_analyzer_libs"
    links.mkdir(parents=True, exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        found = sorted(libs.glob(pattern))
        if found and not (links / name).exists():
            (links / name).symlink_to(found[0])
    # On a CUDA 13 host (NVIDIA's 26.x server images) libcudart.so.12 comes from the nvidia-cuda-runtime-cu12 wheel.
    cuda12 = [str(Path(p) / "nvidia" / "cuda_runtime" / "lib") for p in sys.path
              if (Path(p) / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12").is_file()]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(links), *cuda12[:1], env.get("LD_LIBRARY_PATH", "")) if p)
    return [binary, *args], env
