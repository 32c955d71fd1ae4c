"""The CPU engines (sdtrt/pipeline/runners.py): OpenVINO beside onnxruntime, in-process and served, selected by the
generated configs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sdtrt.client import Client
from sdtrt.contract.errors import UsageError
from sdtrt.pipeline.local import LocalPipeline
from sdtrt.model_repository.configs import ServingOptions, network_config
from sdtrt.requests.request import Txt2ImgRequest
from sdtrt.contract.spec import load_spec

REQUEST = dict(prompt="a lighthouse on a cliff", sampler="Euler a", steps=6, seed=3, width=64, height=96)


@pytest.fixture(scope="module")
def onnxruntime_images(local_pipeline) -> np.ndarray:
    return local_pipeline.txt2img(Txt2ImgRequest(**REQUEST)).images.astype(int)


def test_openvino_fp32_gives_onnxruntimes_pictures(exported_repo, onnxruntime_images):
    images = LocalPipeline(exported_repo, backend="openvino", precision="fp32").txt2img(Txt2ImgRequest(**REQUEST)).images
    assert np.abs(images.astype(int) - onnxruntime_images).max() <= 1


def test_openvino_bf16_stays_close(exported_repo, onnxruntime_images):
    """bf16 is a precision trade like FP16 engines on a GPU: pictures close to fp32's, not equal (where the CPU
    has no bf16, OpenVINO computes in fp32 and they are equal)."""
    images = LocalPipeline(exported_repo, backend="openvino", precision="bf16").txt2img(Txt2ImgRequest(**REQUEST)).images
    difference = np.abs(images.astype(int) - onnxruntime_images)
    assert difference.mean() <= 3 and difference.max() <= 40


def test_the_configs_name_the_engine_and_refuse_what_it_cannot_do(exported_repo):
    spec = load_spec(exported_repo)
    config = network_config(spec, spec.component("unet"), ServingOptions(cpu_engine="openvino", cpu_precision="bf16"))
    assert config.backend == "python"
    assert config.parameters["engine"].string_value == "openvino"
    assert config.parameters["precision"].string_value == "bf16"
    with pytest.raises(UsageError, match="onnxruntime runs fp32 only"):
        ServingOptions(cpu_engine="onnxruntime", cpu_precision="bf16")
    with pytest.raises(UsageError, match="CPU engine must be one of"):
        ServingOptions(cpu_engine="tvm")


@pytest.mark.slow  # a second server on OpenVINO
def test_served_openvino_matches_in_process(exported_repo, tmp_path):
    from servers import free_ports

    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.model_repository.build import write_repository

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    write_repository(repo, None, ServingOptions(cpu_engine="openvino", cpu_precision="bf16"))
    expected = LocalPipeline(repo, backend="openvino", precision="bf16").txt2img(Txt2ImgRequest(**REQUEST)).images
    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=tmp_path / "triton.log") as server:
        request = dict(REQUEST)
        served = Client(server.url).txt2img(request.pop("prompt"), **request).images
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1
    assert (repo / "default__unet" / "1" / "openvino_cache").is_dir()  # the next start loads compiled blobs


def test_a_stale_model_goes_with_its_openvino_cache(tmp_path):
    """A network model an earlier export generated and this one no longer has is removed whole, OpenVINO's
    compiled networks included: a folder left behind would make Triton (loading every model) fail to start."""
    from sdtrt.model_repository.build import remove_stale_models
    from sdtrt.model_repository.configs import GENERATED_HEADER

    folder = tmp_path / "old__unet"
    (folder / "1" / "openvino_cache").mkdir(parents=True)
    (folder / "1" / "openvino_cache" / "1234.blob").write_bytes(b"compiled")
    (folder / "config.pbtxt").write_text(GENERATED_HEADER + 'name: "old__unet"\n')
    (folder / "1" / "model.py").write_text("# generated\n")
    mine = tmp_path / "mine"
    (mine / "1").mkdir(parents=True)
    (mine / "1" / "weights.bin").write_bytes(b"user data")
    remove_stale_models(tmp_path, current=set())
    assert not folder.exists() and (mine / "1" / "weights.bin").exists()
