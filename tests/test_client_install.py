"""The client side installs alone: `pip install ".[client]"` into a fresh venv gives the client, the generation
commands, the A1111 gateway and the page, without torch, diffusers, transformers or onnxruntime, and that venv
generates an image from a real server."""

from __future__ import annotations

import pytest

import json
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SERVER_SIDE = {"torch", "diffusers", "transformers", "onnxruntime", "onnx", "tokenizers", "safetensors", "peft",
               "accelerate", "nvidia-pytriton", "tensorrt-cu13"}


@pytest.mark.slow  # a fresh venv and a pip install: ~80 s
def test_client_only_install_generates_from_a_real_server(server, tmp_path):
    source = tmp_path / "src"  # a copy: pip builds in the source tree, and the checkout stays as it is
    anywhere = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*")

    def ignore(folder: str, names: list[str]) -> set[str]:  # a run's own folders at the top, not model_repository/models
        top = {"models", "repos", "outputs", "logs", "bench-work"} if Path(folder) == ROOT else set()
        return set(anywhere(folder, names)) | (top & set(names))

    shutil.copytree(ROOT, source, ignore=ignore)
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              f"{source}[client]"], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "sdtrt" in installed and "tritonclient" in installed and "gradio" in installed
    assert not (installed & SERVER_SIDE), installed & SERVER_SIDE

    sdtrt = str(venv / "bin" / "sdtrt")
    out = tmp_path / "outputs"
    made = subprocess.run([sdtrt, "txt2img", "a lighthouse at dawn", "--url", server.url, "--steps", "3", "--width", "64",
                           "--height", "64", "--seed", "5", "--out", str(out)], capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    assert made.stderr.strip() == ""  # only sdtrt's own output, no third-party chatter
    (png,) = out.iterdir()
    with Image.open(png) as image:
        assert image.size == (64, 64) and "Seed: 5" in image.info["parameters"]
    info = subprocess.run([sdtrt, "png-info", str(png)], capture_output=True, text=True)
    assert info.returncode == 0 and "Steps: 3" in info.stdout
    help_ = subprocess.run([sdtrt, "txt2img", "--url", server.url, "--help"], capture_output=True, text=True)
    assert "sampling steps; an integer, from 1 to 150 (default: 20)" in " ".join(help_.stdout.split())
    imports = subprocess.run([str(python), "-c", "import sys, sdtrt.client, sdtrt.client.apps.a1111_api, sdtrt.client.apps.ui, "
                              "sdtrt.client.apps.cli; print(sorted({'torch', 'diffusers', 'transformers', 'onnxruntime'} & "
                              "set(sys.modules)))"], capture_output=True, text=True, cwd=tmp_path)  # not beside sdtrt/
    assert imports.returncode == 0 and imports.stdout.strip() == "[]", imports.stdout + imports.stderr
