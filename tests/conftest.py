"""Shared fixtures: the default model and its export are built once per test session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> Path:
    from sdtrt.pipeline.default_model import build_default_model

    return build_default_model(tmp_path_factory.mktemp("models") / "default")


@pytest.fixture(scope="session")
def export_default(default_model, tmp_path_factory):
    """The default model exported quietly into a fresh folder named after ``name``, with export ``options``."""
    from sdtrt.export import export_model

    def export(name: str, leaf: str = "repo", **options) -> Path:
        out = tmp_path_factory.mktemp(name) / leaf
        export_model(default_model, out, progress=False, report=lambda *_: None, **options)
        return out

    return export


@pytest.fixture(scope="session")
def exported_repo(export_default) -> Path:
    return export_default("repos", "default")


@pytest.fixture(scope="session")
def diffusers_pipe(default_model):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def local_pipeline(exported_repo):
    from sdtrt.pipeline.local import LocalPipeline

    return LocalPipeline(exported_repo)


@pytest.fixture(scope="session")
def server(exported_repo, tmp_path_factory):
    """A real tritonserver on the exported repository, on free loopback ports, for the whole session."""
    from servers import free_ports

    from sdtrt.model_repository.serving.server import TritonServer

    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    triton = TritonServer(exported_repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log)
    with triton:
        yield triton


@pytest.fixture(scope="session")
def inpainting_model(tmp_path_factory) -> Path:
    from sdtrt.pipeline.default_model import build_default_model

    return build_default_model(tmp_path_factory.mktemp("models") / "inpainting", inpainting=True)


@pytest.fixture(scope="session")
def inpainting_pipeline(inpainting_model, tmp_path_factory):
    from sdtrt.export import export_model
    from sdtrt.pipeline.local import LocalPipeline

    out = tmp_path_factory.mktemp("repos") / "inpainting"
    export_model(inpainting_model, out, progress=False, report=lambda *_: None)
    return LocalPipeline(out)
