"""LoRAs and embeddings per request: ``<lora:name:weight>`` tags and embeddings by name, in-process and served,
checked against diffusers' own ``load_lora_weights`` / ``load_textual_inversion`` on the same weights and seeds."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from loras import make_embedding, make_lora, to_kohya
from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff
from servers import free_ports
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.request import Txt2ImgRequest

SETTINGS = dict(sampler="Euler", steps=6, seed=5, width=64, height=64)
EMBEDDING = "tiembed"  # two vectors; lowercase, as CLIP's tokenizer sees every name


@pytest.fixture(scope="module")
def files(default_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("extra")
    loras, embeddings = root / "loras", root / "embeddings"
    make_lora(default_model, loras, seed=7, text_encoder=True, name="test", strength=4)  # text encoder + U-Net, rank 4
    make_lora(default_model, loras, seed=8, rank=8, name="other", strength=4)  # U-Net only, rank 8
    make_embedding(embeddings, EMBEDDING, vectors=2, hidden=32)
    return loras, embeddings


@pytest.fixture(scope="module")
def repo(default_model, files, tmp_path_factory):
    from sdtrt.export import export_model

    out = tmp_path_factory.mktemp("repos") / "extra"
    export_model(default_model, out, lora_dir=files[0], embedding_dir=files[1], max_lora_rank=16, progress=False,
                 report=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def local(repo):
    from sdtrt.pipeline.local import LocalPipeline

    return LocalPipeline(repo)


@pytest.fixture(scope="module")
def served(repo, tmp_path_factory):
    from sdtrt.model_repository.serving.server import TritonServer

    http, grpc, metrics = free_ports(3)
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log) as triton:
        yield triton


@pytest.fixture(scope="module")
def client(served):
    from sdtrt.client import Client

    return Client(served.url)


def reference(default_model, files, prompt, negative_prompt="", loras=(), embedding=False):
    """diffusers' pipeline, built afresh, with the LoRAs loaded at their weights and the embedding loaded."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in loras:
        pipe.load_lora_weights(str(files[0] / f"{name}.safetensors"), adapter_name=name)
    if loras:
        pipe.set_adapters([name for name, _ in loras], adapter_weights=[weight for _, weight in loras])
    if embedding:
        pipe.load_textual_inversion(str(files[1] / f"{EMBEDDING}.safetensors"), token=EMBEDDING)
    return diffusers_images(pipe, prompt=prompt, negative_prompt=negative_prompt, cfg=7.0, **SETTINGS)


@pytest.fixture(scope="module")
def expected(default_model, files):
    """The reference pictures the tests compare with, each made once."""
    return {
        "plain": reference(default_model, files, "a cat"),
        "test": reference(default_model, files, "a cat", loras=[("test", 0.8)]),
        "other": reference(default_model, files, "a cat", loras=[("other", 1.0)]),
        "both": reference(default_model, files, "a cat", loras=[("test", 0.8), ("other", 0.5)]),
        "embedding": reference(default_model, files, f"a {EMBEDDING} cat", embedding=True),
    }


REQUESTS = {  # name -> prompt, negative prompt
    "plain": ("a cat", ""),
    "test": ("a cat <lora:test:0.8>", ""),
    "other": ("a cat <lora:other>", ""),
    "both": ("a cat <lora:test:0.8>", "<lora:other:0.5>"),  # A1111 applies a LoRA named in either prompt
    "embedding": (f"a {EMBEDDING} cat", ""),
}


def request(name: str) -> Txt2ImgRequest:
    prompt, negative = REQUESTS[name]
    return Txt2ImgRequest(prompt=prompt, negative_prompt=negative, guidance_scale=7.0, **SETTINGS)


def test_registered_at_export(repo):
    from sdtrt.contract.spec import LORA_RANK, load_spec

    spec = load_spec(repo)
    assert sorted(spec.loras) == ["other", "test"] and spec.loras["test"]["rank"] == {"text_encoder": 4, "unet": 4}
    assert spec.loras["other"]["rank"] == {"unet": 8}
    assert spec.embeddings[EMBEDDING]["vectors"] == 2
    assert {"unet_lora", "text_encoder_lora"} <= set(spec.components) and spec.dims[LORA_RANK].max == 16
    assert all((repo / entry["file"]).is_file() for entry in [*spec.loras.values(), *spec.embeddings.values()])


@pytest.mark.parametrize("name", list(REQUESTS))
def test_in_process_matches_diffusers(local, expected, name):
    images = local.txt2img(request(name)).images
    assert max_diff(images, expected[name]) <= MAX_PIXEL_DIFF
    if name != "plain":  # the LoRA / embedding really changed the picture
        assert max_diff(images, expected["plain"]) > 10 * MAX_PIXEL_DIFF


def test_served_lora_then_none_matches_diffusers(client, expected):
    """The acceptance: "a cat <lora:test:0.8>" equals diffusers with that LoRA at 0.8, and the next request without
    the tag equals diffusers without it (nothing of the LoRA is left behind); then another LoRA, then none again."""
    for name in ("test", "plain", "other", "both", "embedding", "plain"):
        prompt, negative = REQUESTS[name]
        images = client.txt2img(prompt=prompt, negative_prompt=negative, guidance_scale=7.0, **SETTINGS).images
        assert max_diff(images, expected[name]) <= MAX_PIXEL_DIFF, name


def test_concurrent_requests_each_get_their_own_lora(client, expected):
    names = ["test", "other", "plain", "both", "test", "other"]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(i: int, name: str) -> None:
        try:
            prompt, negative = REQUESTS[name]
            results[i] = client.txt2img(prompt=prompt, negative_prompt=negative, guidance_scale=7.0,
                                        **SETTINGS).images
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, name)) for i, name in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, name in enumerate(names):
        assert max_diff(results[i], expected[name]) <= MAX_PIXEL_DIFF, (i, name)


def test_infotext_records_lora_and_ti_hashes(client, repo):
    from sdtrt.contract.spec import load_spec

    spec = load_spec(repo)
    info = client.txt2img(prompt=f"a {EMBEDDING} cat <lora:test:0.8>", negative_prompt="<lora:other:0.5>",
                          guidance_scale=7.0, **SETTINGS).infotexts[0]
    loras = f'Lora hashes: "test: {spec.loras["test"]["hash"][:12]}, other: {spec.loras["other"]["hash"][:12]}"'
    assert loras in info
    assert f'TI hashes: "{EMBEDDING}: {spec.embeddings[EMBEDDING]["sha256"][:12]}"' in info
    assert info.startswith(f"a {EMBEDDING} cat <lora:test:0.8>\nNegative prompt: <lora:other:0.5>\n")


@pytest.mark.parametrize("prompt, negative, field, message", [
    ("a cat <lora:nope:0.8>", "", "prompt", "a LoRA registered for this model: other, test"),
    ("a cat", "<lora:missing>", "negative_prompt", "a LoRA registered for this model: other, test"),
    ("a cat <lora:test:strong>", "", "prompt", "weights as numbers"),
    ("a cat <hypernet:x:1>", "", "prompt", "<hypernet:...> is not served"),
    ("<lora:other:1> <lora:other:1> <lora:test:1>", "", "prompt", "at most 16 summed rank (these sum to 20)"),
])
def test_unknown_or_bad_loras_are_named(client, local, prompt, negative, field, message):
    from sdtrt.client import ServerError

    with pytest.raises(InvalidRequest, match=re.escape(message)) as error:
        local.txt2img(Txt2ImgRequest(prompt=prompt, negative_prompt=negative, **SETTINGS))
    assert error.value.field == field
    with pytest.raises((InvalidRequest, ServerError), match=re.escape(message)):
        client.txt2img(prompt=prompt, negative_prompt=negative, **SETTINGS)


def test_kohya_format_registers_as_the_same_lora(default_model, files, repo, tmp_path):
    """A1111/kohya's key names and per-layer alpha (what civitai LoRAs are) read as the same matrices."""
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file

    from sdtrt.export.networks.lora import lora_slots, register_loras
    from sdtrt.contract.spec import load_spec

    to_kohya(files[0] / "test.safetensors", tmp_path / "kohya", alpha=2.0)  # rank 4, alpha 2, as made
    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True)
    slots = {net: lora_slots(getattr(pipe, net), net) for net in ("text_encoder", "unet")}
    entry = register_loras(pipe, tmp_path / "kohya", slots, tmp_path / "packed", False, report=lambda *_: None)["test"]
    kohya, diffusers_format = load_file(entry["file"]), load_file(str(repo / load_spec(repo).loras["test"]["file"]))
    assert sorted(kohya) == sorted(diffusers_format) == ["text_encoder.down", "text_encoder.up", "unet.down", "unet.up"]
    for key in kohya:
        np.testing.assert_allclose(kohya[key], diffusers_format[key], rtol=1e-6, atol=1e-7)


def test_a_model_without_loras_names_the_export_option(local_pipeline):
    with pytest.raises(InvalidRequest, match=r"none \(export the model with --loras DIR\)"):
        local_pipeline.txt2img(Txt2ImgRequest(prompt="a cat <lora:test:1>", **SETTINGS))


def test_a_lora_for_another_architecture_is_refused(default_model, tmp_path):
    """A LoRA made for the SD 2.x-shaped model does not fit the SD 1.x-shaped default: a named error at export."""
    from sdtrt.pipeline.default_model import build_default_model
    from sdtrt.contract.errors import UsageError
    from sdtrt.export import export_model

    sd2 = build_default_model(tmp_path / "sd2", family="sd2")
    make_lora(sd2, tmp_path / "loras", name="for_sd2")
    with pytest.raises(UsageError, match="for_sd2.safetensors .*another architecture"):
        export_model(default_model, tmp_path / "repo", lora_dir=tmp_path / "loras", progress=False,
                     report=lambda *_: None)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_an_embedding_for_another_architecture_is_refused(default_model, tmp_path):
    from sdtrt.contract.errors import UsageError
    from sdtrt.export import export_model

    make_embedding(tmp_path / "emb", "wide", vectors=1, hidden=1024)
    with pytest.raises(UsageError, match="wide.safetensors has 1024-wide vectors; this model's text encoder takes 32"):
        export_model(default_model, tmp_path / "repo", embedding_dir=tmp_path / "emb", progress=False,
                     report=lambda *_: None)


def test_gateway_lists_loras_and_embeddings_and_applies_a_tag(client, repo, expected, tmp_path):
    """A1111's /sdapi/v1/loras and /sdapi/v1/embeddings, in A1111's shape; a txt2img with a tag through the gateway
    gets diffusers' picture with that LoRA."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from sdtrt.client.apps.a1111_api import create_app
    from sdtrt.contract.spec import load_spec

    spec = load_spec(repo)
    api = TestClient(create_app(client, tmp_path))
    loras = api.get("/sdapi/v1/loras").json()
    assert sorted(lora["name"] for lora in loras) == ["other", "test"]
    test = next(lora for lora in loras if lora["name"] == "test")
    assert test["alias"] == "test" and test["path"] == "test.safetensors"
    assert test["metadata"]["sshs_model_hash"] == spec.loras["test"]["hash"]
    embeddings = api.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"][EMBEDDING]["vectors"] == 2 and embeddings["loaded"][EMBEDDING]["shape"] == 32
    assert embeddings["skipped"] == {}
    assert api.post("/sdapi/v1/refresh-loras").status_code == 200

    body = {"prompt": REQUESTS["test"][0], "steps": SETTINGS["steps"], "sampler_name": SETTINGS["sampler"],
            "seed": SETTINGS["seed"], "width": 64, "height": 64, "cfg_scale": 7.0}
    answer = api.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB"))
    # the gateway runs A1111's code path (k_diffusion): the served LoRA request on it (itself diffusers' LoRA
    # picture on diffusers' path: test_served_lora_then_none_matches_diffusers)
    served = client.txt2img(REQUESTS["test"][0], guidance_scale=7.0, k_diffusion=True, **SETTINGS)
    assert max_diff(picture[None], served.images) <= MAX_PIXEL_DIFF
    plain = client.txt2img(REQUESTS["plain"][0], guidance_scale=7.0, k_diffusion=True, **SETTINGS)
    assert max_diff(served.images, plain.images) > MAX_PIXEL_DIFF  # the tag's LoRA was applied
    assert "Lora hashes" in answer.json()["info"]
    refused = api.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat <lora:nope:1>"})
    assert refused.status_code == 422 and "other, test" in refused.text


def test_lora_variants_get_tensorrt_profiles_and_configs(repo):
    """What a GPU build would get, checked on the CPU: the LoRA variants' engine profiles span the request ranks the
    export allows, --static-batch pins their rows as the plain U-Net's, and their Triton configs batch by row."""
    from sdtrt.export.tensorrt import EngineOptions, profile_shapes
    from sdtrt.model_repository.configs import ServingOptions, network_config
    from sdtrt.contract.spec import load_spec

    spec = load_spec(repo)
    unet = spec.component("unet_lora")
    shapes = profile_shapes(spec, unet, EngineOptions(static_batch=1))
    d_in, d_out = unet.input("lora_down").shape[2], unet.input("lora_up").shape[2]
    assert shapes["lora_down"] == [(1, 1, d_in), (2, 16, d_in), (2, 16, d_in)]
    assert shapes["lora_up"][2] == (2, 16, d_out) and shapes["sample"][2][0] == 2
    config = network_config(spec, unet, ServingOptions(backend="onnxruntime"))
    assert config.name == f"{spec.key}__unet_lora" and config.max_batch_size == spec.dims["unet_batch"].max
    assert [list(t.dims) for t in config.input][-2:] == [[-1, d_in], [-1, d_out]]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == ServingOptions().unet_queue_delay_us


def test_img2img_with_a_lora_matches_diffusers(default_model, files, local, client):
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from reference import diffusers_img2img, sample_picture
    from sdtrt.requests.request import Img2ImgRequest

    picture = sample_picture(64, 64)
    settings = dict(sampler="Euler", steps=8, seed=9, guidance_scale=7.0, denoising_strength=0.6, width=64, height=64)
    prompt = "a dog <lora:test:0.8>"
    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, dtype=torch.float32)
    pipe.load_lora_weights(str(files[0] / "test.safetensors"), adapter_name="test")
    pipe.set_adapters(["test"], adapter_weights=[0.8])
    expected = diffusers_img2img(pipe, Image.fromarray(picture), prompt="a dog", sampler="Euler", steps=8, cfg=7.0,
                                 strength=0.6, seed=9)
    mine = local.img2img(Img2ImgRequest(prompt=prompt, **settings), picture).images
    assert max_diff(mine, expected) <= MAX_PIXEL_DIFF
    served = client.img2img(prompt, picture, **settings).images
    assert max_diff(served, expected) <= MAX_PIXEL_DIFF
