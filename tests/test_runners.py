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


def test_auto_measures_the_engines_here_and_keeps_its_choice(exported_repo, tmp_path):
    """``auto``: each fp32 engine timed on this machine at the export's optimal shapes, the fastest chosen (the
    timings say which), its outputs onnxruntime's; the choice is kept beside the network and read back, and an
    ONNX file that changed is measured again. bf16 is a candidate only when asked for and native here."""
    from sdtrt.pipeline.runners import (FP32_AGREEMENT, auto_candidates, choose_cpu_engine, cpu_has_bf16, cpu_runner,
                                        typical_feed)

    spec = load_spec(exported_repo)
    unet = spec.component("unet")
    folder = tmp_path / "repo" / "default__unet" / "1"
    folder.mkdir(parents=True)
    onnx = folder / "model.onnx"
    shutil.copy(exported_repo / unet.onnx, onnx)
    feed = typical_feed(spec, unet)
    latent = spec.field("width").default // 8
    assert feed["sample"].shape == (2, 4, latent, latent)  # (a request at the default size, with guidance)
    record = folder / "cpu_engine.json"
    runner, choice = choose_cpu_engine(onnx, unet, feed, auto_candidates(False), record)
    assert choice.measured and set(choice.seconds) == {"onnxruntime fp32", "openvino fp32"} and not choice.refused
    assert choice.label == min(choice.seconds, key=choice.seconds.get)
    want = cpu_runner(onnx, unet).outputs(feed)["noise_pred"]
    assert np.abs(runner.outputs(feed)["noise_pred"] - want).max() <= FP32_AGREEMENT * max(1, np.abs(want).max())
    assert record.is_file() and not list(folder.glob("*.partial"))

    again, kept = choose_cpu_engine(onnx, unet, feed, auto_candidates(False), record)
    assert not kept.measured and kept.label == choice.label and kept.seconds == choice.seconds
    onnx.write_bytes(onnx.read_bytes())  # (a re-export: another modification time)
    _, remeasured = choose_cpu_engine(onnx, unet, feed, auto_candidates(False), record)
    assert remeasured.measured
    assert auto_candidates(True) == ([("openvino", "bf16")] if cpu_has_bf16() else []) + auto_candidates(False)


def _served(exported_repo, repo, options: ServingOptions) -> tuple[np.ndarray, str]:
    """REQUEST's pictures from a copy of the export configured with ``options``, served, and the server's
    Prometheus metrics after it."""
    import urllib.request

    from servers import free_ports

    from sdtrt.model_repository.build import write_repository
    from sdtrt.model_repository.serving.server import TritonServer

    shutil.copytree(exported_repo, repo)
    write_repository(repo, None, options)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=repo.parent / "log") as server:
        request = dict(REQUEST)
        images = Client(server.url).txt2img(request.pop("prompt"), **request).images
        return images, urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()


def test_served_auto_engines_draw_onnxruntimes_picture_and_say_what_they_run(exported_repo, onnxruntime_images,
                                                                             tmp_path):
    """Exported with the CLI's default (--cpu-engine auto), every network measures at its first start and keeps
    its choice; the picture is onnxruntime's; `sdtrt serve` prints what each network runs."""
    from sdtrt.client.apps.cli import cpu_engine_report

    repo = tmp_path / "repo"
    served, _ = _served(exported_repo, repo, ServingOptions(cpu_engine="auto"))
    assert np.abs(served.astype(int) - onnxruntime_images).max() <= 1
    spec = load_spec(repo)
    for name in spec.components:
        assert (repo / spec.triton_name(name) / "1" / "cpu_engine.json").is_file(), name
    report = cpu_engine_report(repo)
    assert len(report) == len(spec.components) and all("onnxruntime fp32" in line for line in report), report


def test_in_process_loop_networks_draw_the_same_picture_without_a_bls_call_a_step(exported_repo, onnxruntime_images,
                                                                                 tmp_path):
    """--loop-networks in-process: the loop's U-Net steps run in the job model's own process (the same engine on
    the same ONNX), so Triton's U-Net model is never called (its inference count stays 0) while the text encoder
    and the VAE still are; the picture is the BLS path's. Other backends refuse it, naming why."""
    import re

    with pytest.raises(UsageError, match="in-process loop networks run the python backend"):
        ServingOptions(backend="onnxruntime", loop_networks="in_process")
    served, text = _served(exported_repo, tmp_path / "repo", ServingOptions(loop_networks="in_process"))

    def count(model: str) -> int:
        found = re.search(rf'nv_inference_count{{model="{model}",version="1"}} (\d+)', text)
        assert found, model
        return int(found.group(1))

    assert np.abs(served.astype(int) - onnxruntime_images).max() <= 1
    assert count("default__unet") == 0 and count("default__text_encoder") >= 1 and count("default__vae_decoder") >= 1
