"""Several models in one repository and one server, as users have them: exported one by one into the same
repository, each chosen per request (client, raw Triton, A1111 gateway), unloaded, loaded and added while the
server keeps serving. The pictures are checked against diffusers on each model's own weights."""

from __future__ import annotations

import json
import time

import pytest
import tritonclient.grpc as grpcclient
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff
from servers import raw_infer, triton_on
from sdtrt.client import Client, ServerError
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.infotext import parse_infotext

REQUEST = dict(prompt="a red barn in snow", negative_prompt="blurry", sampler="Euler a", steps=6, seed=11,
               width=64, height=64)


def cli(*args: str) -> int:
    from sdtrt.client.apps.cli import main

    return main([*args])


@pytest.fixture(scope="module")
def sd2_model(tmp_path_factory):
    from sdtrt.pipeline.default_model import build_default_model

    return build_default_model(tmp_path_factory.mktemp("models") / "tiny-sd2", family="sd2")


@pytest.fixture(scope="module")
def repo(default_model, sd2_model, tmp_path_factory):
    """Two architectures in one repository: the SD 1.x default model named "anime" (first, so the default) and
    the SD 2.x v-prediction one under its folder's name, with request limits of its own."""
    repo = tmp_path_factory.mktemp("multi") / "repo"
    assert cli("export", str(default_model), "--out", str(repo), "--name", "anime") == 0
    assert cli("export", str(sd2_model), "--out", str(repo), "--max-batch", "2") == 0
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    with triton_on(repo, tmp_path_factory.mktemp("logs")) as triton:
        yield triton


@pytest.fixture(scope="module")
def sd2_pipe(sd2_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd2_model), local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.pad_token == "!"  # A1111 pads OpenCLIP's chunks with "!" too (see test_single_file)
    return pipe


def expected(pipe, **overrides):
    r = {**REQUEST, **overrides}
    return diffusers_images(pipe, prompt=r["prompt"], negative_prompt=r["negative_prompt"], sampler=r["sampler"],
                            steps=r["steps"], cfg=7.0, seed=r["seed"], width=r["width"], height=r["height"])


def test_a_repository_holds_both_models_under_their_names(repo, capsys):
    from sdtrt.contract.spec import load_catalog

    catalog = load_catalog(repo)
    assert catalog.default == "anime" and set(catalog.models) == {"anime", "tiny-sd2"}
    assert catalog.get("tiny-sd2").prediction_type == "v_prediction" and catalog.get().prediction_type == "epsilon"
    for key in catalog.models:
        for part in ("tokenizer", "text_encoder", "unet", "vae_decoder", "vae_encoder"):
            assert (repo / f"{key}__{part}" / "config.pbtxt").is_file(), (key, part)
    capsys.readouterr()
    assert cli("models", "--repo", str(repo)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("anime (default): Model default [") and "epsilon, 512px native" in lines[0]
    assert lines[1].startswith("tiny-sd2: Model tiny-sd2 [") and "v_prediction, 512px native" in lines[1]


def test_re_exporting_one_model_leaves_it_and_the_other_untouched(repo, default_model, sd2_model, capsys):
    from sdtrt.contract.spec import load_catalog

    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()}
    assert cli("export", str(default_model), "--out", str(repo), "--name", "anime") == 0
    assert "anime is already exported from the same inputs" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()} == before
    # --default on an unchanged model only moves the default (the catalog and the jobs' configs)
    assert cli("export", str(sd2_model), "--out", str(repo), "--max-batch", "2", "--default") == 0
    assert "tiny-sd2 is now the default model" in capsys.readouterr().out
    assert load_catalog(repo).default == "tiny-sd2" and '\\"default\\":\\"tiny-sd2\\"' in (
        repo / "txt2img" / "config.pbtxt").read_text()
    assert cli("export", str(default_model), "--out", str(repo), "--name", "anime", "--default") == 0
    assert load_catalog(repo).default == "anime"


def test_each_model_answers_with_its_own_pictures(server, diffusers_pipe, sd2_pipe):
    client = Client(server.url)
    assert client.models == ["anime", "tiny-sd2"] and client.spec.key == "anime"
    anime = client.txt2img(**REQUEST, model="anime")
    sd2 = client.txt2img(**REQUEST, model="tiny-sd2")
    assert max_diff(anime.images, expected(diffusers_pipe)) <= MAX_PIXEL_DIFF
    assert max_diff(sd2.images, expected(sd2_pipe)) <= MAX_PIXEL_DIFF
    assert max_diff(anime.images, sd2.images) > 10 * MAX_PIXEL_DIFF  # two models, not one answered twice
    assert max_diff(client.txt2img(**REQUEST).images, anime.images) == 0  # no model named: the default
    assert parse_infotext(sd2.infotexts[0])[2]["Model"] == "tiny-sd2"
    assert parse_infotext(anime.infotexts[0])[2]["Model"] == "anime"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_each_model_keeps_its_own_request_limits(server, protocol):
    """A field is checked against the model the request is for, by the client and by the server."""
    small = {"prompt": ("x", "BYTES"), "steps": (2, "INT32"), "width": (64, "INT32"), "height": (64, "INT32"),
             "batch_size": (3, "INT32")}
    assert raw_infer(server, {**small, "model": ("anime", "BYTES")}, protocol).as_numpy("images").shape[0] == 3
    with pytest.raises(InferenceServerException, match=r"batch_size=3: batch_size must be .*2"):
        raw_infer(server, {**small, "model": ("tiny-sd2", "BYTES")}, protocol)
    client = Client(server.url if protocol == "grpc" else server.http_url, protocol=protocol)
    assert client.request("x", batch_size=3).batch_size == 3
    with pytest.raises(InvalidRequest, match="batch_size"):
        client.request("x", model="tiny-sd2", batch_size=3)
    with pytest.raises(InvalidRequest, match="model"):
        client.txt2img("x", model="nope")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_unknown_model_is_refused_naming_the_field_and_the_choices(server, protocol):
    with pytest.raises(InferenceServerException) as refused:
        raw_infer(server, {"prompt": ("x", "BYTES"), "steps": (2, "INT32"), "model": ("nope", "BYTES")}, protocol)
    message = refused.value.message()
    assert "model" in message and "'nope'" in message and "'anime', 'tiny-sd2'" in message
    response = raw_infer(server, {"prompt": ("x", "BYTES"), "steps": (2, "INT32"), "width": (64, "INT32"),
                                  "height": (64, "INT32"), "model": ("tiny-sd2", "BYTES")}, protocol)
    assert response.as_numpy("images").shape == (1, 64, 64, 3)


def test_a_model_unloads_and_loads_back_without_a_restart(server, capsys):
    """`sdtrt models unload/load` while `sdtrt serve`'s healer watches: an unload on purpose is not a death to
    heal, and the stubs of the model loaded back are watched (killing one gets it reloaded)."""
    import os
    import signal

    from sdtrt.model_repository.serving.health import Healer, stubs_of

    triton = grpcclient.InferenceServerClient(server.url)
    client = Client(server.url)
    pid = server.process.pid
    events: list[dict] = []
    healer = Healer(server, interval=0.1, on_event=events.append).start()
    try:
        assert cli("models", "unload", "tiny-sd2", "--url", server.url) == 0
        try:
            assert not triton.is_model_ready("tiny-sd2__unet") and triton.is_model_ready("anime__unet")
            assert triton.is_server_ready()  # the server serves what it has loaded
            with pytest.raises(ServerError, match="unloaded.*sdtrt models load tiny-sd2"):
                client.txt2img(**REQUEST, model="tiny-sd2")
            assert client.txt2img(**REQUEST, model="anime").images.shape == (1, 64, 64, 3)
            capsys.readouterr()
            assert cli("models", "--url", server.url) == 0
            listed = capsys.readouterr().out.splitlines()
            assert listed[0].startswith("anime (default): ") and listed[0].endswith("  loaded")
            assert listed[1].startswith("tiny-sd2: ") and listed[1].endswith("  unloaded")
            assert not triton.is_model_ready("tiny-sd2__unet")  # the healer left it unloaded
        finally:
            assert cli("models", "load", "tiny-sd2", "--url", server.url) == 0
        assert triton.is_model_ready("tiny-sd2__unet") and server.process.pid == pid
        assert client.txt2img(**REQUEST, model="tiny-sd2").images.shape == (1, 64, 64, 3)
        assert not [e for e in events if e["event"] != "healer_error"], events
        time.sleep(0.5)  # a check or two: the healer picks up the new stubs
        (victim,) = stubs_of(pid, "tiny-sd2__unet")
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not any(e["event"] == "model_reloaded" for e in events) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        healer.stop()
    died = next((e for e in events if e["event"] == "stub_died"), None)
    assert died is not None, events
    assert died["model"] == "tiny-sd2__unet" and died["pids"] == [victim.pid]
    assert client.txt2img(**REQUEST, model="tiny-sd2").images.shape == (1, 64, 64, 3)
    assert not [e for e in events if e["event"] == "healer_error"], events


def test_the_a1111_gateway_lists_the_models_and_switches_between_them(server, tmp_path):
    api = TestClient(create_app(Client(server.url), tmp_path))
    titles = [m["title"] for m in api.get("/sdapi/v1/sd-models").json()]
    assert [t.split(" [")[0] for t in titles] == ["anime", "tiny-sd2"]
    small = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 5}

    def model_of(response) -> str:
        assert response.status_code == 200, response.text
        return parse_infotext(json.loads(response.json()["info"])["infotexts"][0])[2]["Model"]

    assert model_of(api.post("/sdapi/v1/txt2img", json=small)) == "anime"
    assert api.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles[1]}).status_code == 200
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[1]
    assert model_of(api.post("/sdapi/v1/txt2img", json=small)) == "tiny-sd2"
    override = {**small, "override_settings": {"sd_model_checkpoint": "anime"}}
    assert model_of(api.post("/sdapi/v1/txt2img", json=override)) == "anime"
    assert model_of(api.post("/sdapi/v1/txt2img", json=small)) == "tiny-sd2"  # an override lasts one request


@pytest.mark.slow  # a third export and a load (~55 s); the default suite keeps unload/load without a restart
def test_a_model_exported_into_the_live_repository_is_added_without_a_restart(server, repo, default_model,
                                                                              diffusers_pipe):
    client = Client(server.url)
    assert cli("export", str(default_model), "--out", str(repo), "--name", "third") == 0
    assert client.models == ["anime", "tiny-sd2"]  # the server reads its repository only when told to
    assert cli("models", "load", "third", "--url", server.url) == 0
    result = client.txt2img(**REQUEST, model="third")  # the client looks the new name up
    assert client.models == ["anime", "tiny-sd2", "third"]
    assert max_diff(result.images, expected(diffusers_pipe)) <= MAX_PIXEL_DIFF


def test_tensorrt_and_onnx_models_do_not_mix_in_one_repository(default_model, exported_repo, tmp_path):
    """One backend per repository: refused before exporting anything (checked without a GPU)."""
    import shutil
    from dataclasses import replace

    from sdtrt.contract.errors import UsageError
    from sdtrt.export import export_model
    from sdtrt.export.tensorrt import EngineOptions
    from sdtrt.contract.spec import ENGINES, load_catalog

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo, repo)
    quiet = dict(progress=False, report=lambda *_: None)
    with pytest.raises(UsageError, match=r"also serves default without TensorRT engines.*build-engines .* --model "
                                         r"default"):
        export_model(default_model, repo, name="fast", engines=EngineOptions(), **quiet)
    catalog = load_catalog(repo)
    spec = catalog.get()
    catalog.models[spec.key] = replace(spec, extra={**spec.extra, ENGINES: {"unet": {"file": "unet.plan"}}})
    catalog.save(repo)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match=r"serves TensorRT engines \(default\): export this model with --format trt"):
        export_model(default_model, repo, name="plain", **quiet)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing left behind
