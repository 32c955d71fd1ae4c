"""The GPU and CPU images and the compose file, checked without a Docker engine: hadolint, the user they run as,
what the build context sends, and that every command compose (and the CPU image) runs exists."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.cpu"
COMPOSE = ROOT / "docker" / "compose.yaml"
# Triton's build creates this user with uid/gid 1000 and asserts it (server repo, build.py, "triton-server").
BASE_USER_UID = "1000:1000"
# The oldest Triton release the GPU image may build on: the newest "fixed in" release of NVIDIA's Triton security
# bulletins (github.com/NVIDIA/product-security). August 2025 (CVE-2025-23319, -23320, -23334 in the Python backend,
# -23310/-23311/-23317 in the HTTP server): 25.07; September 2025: 25.08; November 2025: 25.09; December 2025: 25.10;
# March to July 2026: 26.01 to 26.05; August 2026: 26.06; 8 September 2026 (CVE-2026-16497): 26.07. Raise it with
# each new bulletin.
TRITON_FIXED = (26, 7)
TRITON_IMAGE = re.compile(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3(@sha256:[0-9a-f]{64})?")
TRITON_PORTS = {8000, 8001, 8002}


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None)


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, CPU_DOCKERFILE], ids=["gpu", "cpu"])
def test_dockerfile_passes_hadolint(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (it comes with the dev extra: scripts/setup.sh)")
    done = subprocess.run([binary, str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_runs_as_the_base_images_own_non_root_user():
    steps = instructions()
    assert steps[1] == ("FROM", "${TRITON_IMAGE}") and steps[0][0] == "ARG" and steps[0][1].startswith("TRITON_IMAGE=")
    text = " ".join(args for _, args in steps)
    assert not re.search(r"\b(useradd|adduser|usermod|groupadd)\b", text), "the base image's uid 1000 is taken"
    users = [args for name, args in steps if name == "USER"]
    assert users[-1] == BASE_USER_UID
    # the build fails, rather than run as someone else, if the base image's user is not that uid
    assert '"$(id -u triton-server):$(id -g triton-server)" = "1000:1000"' in text
    chowned = next(args for name, args in steps if name == "RUN" and "chown" in args)
    assert all(folder in chowned for folder in ("/models", "/outputs", "/home/triton-server"))


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's matching, enough for these patterns: '**/' matches any depth, a pattern also covers what is under it."""
    parts = path.split("/")
    for pattern in patterns:
        bare = pattern[3:] if pattern.startswith("**/") else pattern
        candidates = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)] \
            if pattern.startswith("**/") else ["/".join(parts[:j]) for j in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatchcase(c, bare) for c in candidates):
            return True
    return False


def test_build_context_sends_the_sources_and_keeps_models_out():
    patterns = dockerignore_patterns()
    for heavy in ("models/sd15/unet/diffusion_pytorch_model.safetensors", "repos/sd15/unet/1/model.onnx", ".venv/bin/python",
                  ".git/HEAD", "outputs/00001-42.png", "bench-work/repo/trt_engines.json", "sdtrt/__pycache__/x.pyc"):
        assert ignored(heavy, patterns), heavy
    copied = [shlex.split(args)[0] for name, args in instructions() if name == "COPY"]
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package.values()) | {"benchmarks", "tests"} <= set(copied)  # every folder of the package
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), source
        for path in (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else []:
            if "__pycache__" not in path.parts:
                assert not ignored(path.relative_to(ROOT).as_posix(), patterns), path


def test_the_clip_vocabulary_baked_into_the_image_is_the_one_sdtrt_reads():
    from sdtrt.pipeline.clip_vocab import OPEN_CLIP_WHEEL

    env = " ".join(args for name, args in instructions() if name == "ENV")
    assert f"SDTRT_CLIP_BPE=/opt/sdtrt/cache/{OPEN_CLIP_WHEEL}" in env


def expand(command: str) -> list[str]:
    """A compose command with ${VAR:-default} replaced by its default."""
    return shlex.split(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command))


def test_every_compose_command_exists_in_the_image():
    """Each service runs a real sdtrt command with flags its parser accepts, a script the image copies, or pytest
    with a marker the project registers."""
    from sdtrt.client.apps.cli import build_parser

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    copied = {shlex.split(args)[0] for name, args in instructions() if name == "COPY"}
    assert {"export", "triton", "bench", "gpu-tests", "ui", "api"} <= set(services)
    for name, service in services.items():
        if "command" not in service:
            continue  # the image's CMD: tritonserver on /models/repo
        args = expand(service["command"])
        if args[0] == "sdtrt":
            build_parser().parse_args(args[1:])  # exits (SystemExit) on an unknown flag
        elif args[0] == "pytest":
            markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
            assert any(m.startswith(args[args.index("-m") + 1] + ":") for m in markers), name
            assert args[-1] in copied
        else:
            script = ROOT / args[0]
            assert script.is_file() and os.access(script, os.X_OK) and args[0].split("/")[0] in copied, name
    image = json.loads(next(args for n, args in instructions() if n == "CMD"))
    assert image[0] == "sdtrt" and "--cuda-memory-pool-byte-size=0:268435456" in image  # serve, with its healer
    separator = image.index("--")
    build_parser().parse_args(image[1:separator])


def test_gpu_benchmark_says_what_is_missing_without_a_gpu(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh"), "--baseline-only"], capture_output=True, text=True,
                          env={**os.environ, "SDTRT_BENCH_DIR": str(tmp_path)})
    assert done.returncode == 1 and "no NVIDIA GPU here" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing built before the check


def test_the_cpu_image_serves_the_cpu_repository_as_a_non_root_user():
    """docker/Dockerfile.cpu (the Kubernetes cpu overlay's image): the same uid as the GPU image (volumes work
    with either), the package's folders copied, the stub placed at build time (the serving user cannot write
    site-packages), and a CMD the CLI accepts, serving where the cpu overlay's export writes."""
    steps = instructions(CPU_DOCKERFILE)
    assert [args for name, args in steps if name == "USER"][-1] == BASE_USER_UID
    copied = [shlex.split(args)[0] for name, args in steps if name == "COPY"]
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package.values()) <= set(copied)
    assert any("ensure_python_stub(pytriton_home())" in args for name, args in steps if name == "RUN")
    from sdtrt.client.apps.cli import build_parser
    from sdtrt.pipeline.clip_vocab import OPEN_CLIP_WHEEL

    assert f"SDTRT_CLIP_BPE=/opt/sdtrt/cache/{OPEN_CLIP_WHEEL}" in " ".join(a for n, a in steps if n == "ENV")
    image = json.loads(next(args for n, args in steps if n == "CMD"))
    parsed = build_parser().parse_args(image[1:])
    assert str(parsed.model_repository) == "/models/repos/cpu"


def test_the_gpu_image_builds_on_a_triton_release_with_the_security_fixes():
    """The base tag's YY.MM is at least the release that fixes every Triton security bulletin so far (the August 2025
    Python-backend CVEs among them), and pyproject.toml's [gpu] TensorRT is the CUDA major of that image."""
    name, _, image = instructions()[0][1].partition("=")
    assert name == "TRITON_IMAGE"
    matched = TRITON_IMAGE.fullmatch(image)
    assert matched, f"{image}: not nvcr.io/nvidia/tritonserver:YY.MM-py3[@sha256:...]"
    assert (int(matched.group(1)), int(matched.group(2))) >= TRITON_FIXED, f"{image} predates Triton's security fixes"
    (gpu,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert re.fullmatch(r"tensorrt-cu13==[\d.]+", gpu), gpu  # 26.xx images are CUDA 13
    assert f"[gpu] extra ({gpu})" in DOCKERFILE.read_text()  # the comment that states the versions says it too


def published(port: str | dict) -> tuple[str, int]:
    """(host address, container port) of a compose port entry, short ("[IP:]HOST:CONTAINER") or long syntax."""
    if isinstance(port, dict):
        return port.get("host_ip", "0.0.0.0"), int(port["target"])
    parts = str(port).split("/")[0].rsplit(":", 2)
    return (parts[0] if len(parts) == 3 else "0.0.0.0"), int(parts[-1])


def test_compose_publishes_triton_on_loopback_only():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    triton = [published(p) for p in services["triton"]["ports"]]
    assert {port for _, port in triton} == TRITON_PORTS
    assert all(host == "127.0.0.1" for host, _ in triton), triton
    for name, service in services.items():  # nobody else publishes Triton's ports either
        for host, port in (published(p) for p in service.get("ports", [])):
            assert port not in TRITON_PORTS or host == "127.0.0.1", (name, host, port)


def test_compose_gives_the_page_and_the_api_credentials_and_triton_its_control_key():
    """ui and api listen on 0.0.0.0 in their containers, which `sdtrt ui/api` refuse without credentials: each reads
    them from a compose secret; triton reads its control key from one (SDTRT_CONTROL_KEY_FILE, as `sdtrt serve` and
    `sdtrt models` look for it)."""
    from sdtrt.client.apps.cli import build_parser

    compose = yaml.safe_load(COMPOSE.read_text())
    services, secrets = compose["services"], compose["secrets"]
    for name, flag in (("ui", "gradio_auth_path"), ("api", "api_auth_path")):
        parsed = build_parser().parse_args(expand(services[name]["command"])[1:])
        path = getattr(parsed, flag)
        assert path is not None and path.parent.as_posix() == "/run/secrets", name
        assert path.name in services[name]["secrets"] and path.name in secrets, name
        assert not parsed.allow_unauthenticated, name
    triton = services["triton"]
    key = Path(triton["environment"]["SDTRT_CONTROL_KEY_FILE"])
    assert key.parent.as_posix() == "/run/secrets" and key.name in triton["secrets"] and key.name in secrets
    for name, service in services.items():  # the key is Triton's alone
        assert name == "triton" or key.name not in service.get("secrets", []), name


def test_the_compose_secrets_stay_out_of_git_and_of_the_build_context():
    patterns = dockerignore_patterns()
    for secret in yaml.safe_load(COMPOSE.read_text())["secrets"].values():
        path = (COMPOSE.parent / secret["file"]).resolve().relative_to(ROOT).as_posix()
        assert ignored(path, patterns), f"{path} would be sent to the Docker build context"
        if shutil.which("git") and (ROOT / ".git").exists():
            checked = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path])
            assert checked.returncode == 0, f"{path} is not ignored by git"
