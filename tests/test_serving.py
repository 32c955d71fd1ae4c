"""The served pipeline: a real tritonserver, real gRPC/HTTP, checked against diffusers and the local runner."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from PIL import Image

from servers import raw_infer
from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff, sample_mask, sample_picture
from sdtrt.client import Client, ServerError
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.plan import validate
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest
from sdtrt.contract.samplers import SAMPLERS
from sdtrt.requests.request import job_fields
from sdtrt.contract.spec import FIRSTPASS_IMAGE, MODEL, WIRE_DTYPES, load_spec
from sdtrt.model_repository.configs import CONTROL_PICTURES

MODELS = ["default__tokenizer", "default__text_encoder", "default__unet", "default__vae_decoder", "default__vae_encoder",
          "txt2img", "img2img"]


def clients(server):
    return {"grpc": Client(server.url, "grpc"), "http": Client(server.http_url, "http")}


def test_health_and_metadata(server, exported_repo):
    spec = load_spec(exported_repo)
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/live") as r:
        assert r.status == 200
    grpc = grpcclient.InferenceServerClient(server.url)
    http = httpclient.InferenceServerClient(server.http_url)
    assert grpc.is_server_live() and grpc.is_server_ready() and http.is_server_ready()
    for model in MODELS:
        assert grpc.is_model_ready(model) and http.is_model_ready(model), model
    meta = grpc.get_model_metadata("txt2img", as_json=True)
    inputs = {i["name"]: i["datatype"] for i in meta["inputs"]}
    expected = {name: WIRE_DTYPES[spec.field(name).dtype] for name in job_fields(Txt2ImgRequest)}
    controls = {name: "UINT8" for name in CONTROL_PICTURES}  # the ControlNet units' pictures and masks
    assert inputs == {**expected, MODEL: "BYTES", FIRSTPASS_IMAGE: "UINT8", **controls}  # the model, a first pass
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"images": "UINT8", "seeds": "INT64", "infotexts": "BYTES"}
    unet = http.get_model_metadata("default__unet")
    assert [i["name"] for i in unet["inputs"]] == [t.name for t in spec.component("unet").inputs]
    config = http.get_model_config("default__unet")
    assert config["max_batch_size"] == spec.dims["unet_batch"].max
    assert "dynamic_batching" in config
    with urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics") as r:
        assert "nv_inference_request_success" in r.read().decode()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("sampler,width,height,batch", [("Euler a", 64, 64, 2), ("DPM++ 2M Karras", 96, 64, 1)])
def test_served_image_matches_local_runner_and_diffusers(server, local_pipeline, diffusers_pipe, protocol, sampler,
                                                         width, height, batch):
    settings = dict(negative_prompt="blurry", sampler=sampler, steps=10, guidance_scale=7.0, seed=31337,
                    width=width, height=height, batch_size=batch)
    served = clients(server)[protocol].txt2img("a tiny robot watering plants", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt="a tiny robot watering plants", **settings))
    reference = diffusers_images(diffusers_pipe, prompt="a tiny robot watering plants", negative_prompt="blurry",
                                 sampler=sampler, steps=10, cfg=7.0, seed=31337, width=width, height=height,
                                 batch_size=batch)
    assert served.images.shape == (batch, height, width, 3) and served.images.dtype == np.uint8
    assert served.seeds == [31337 + i for i in range(batch)]
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    assert max_diff(served.images, reference) <= MAX_PIXEL_DIFF
    assert served.infotexts == local.infotexts


@pytest.mark.parametrize("sampler", [name for name, s in SAMPLERS.items() if s.scheduler])  # k-diffusion's: test_k_diffusion
def test_every_sampler_served_matches_diffusers(server, diffusers_pipe, sampler):
    served = Client(server.url).txt2img("a castle in the clouds", negative_prompt="ugly", sampler=sampler, steps=6,
                                        guidance_scale=7.0, seed=2024, width=64, height=64)
    reference = diffusers_images(diffusers_pipe, prompt="a castle in the clouds", negative_prompt="ugly",
                                 sampler=sampler, steps=6, cfg=7.0, seed=2024, width=64, height=64)
    assert max_diff(served.images, reference) <= MAX_PIXEL_DIFF


def test_served_prompt_syntax_long_prompts_and_clip_skip_match_the_local_runner(server, local_pipeline):
    prompt = "a ((lighthouse)) on a [cliff], (stormy sea:1.4) BREAK " + " ".join(["oil painting"] * 50)  # 3 chunks
    settings = dict(negative_prompt="(blurry:1.3), " + " ".join(["ugly"] * 80), clip_skip=2, steps=6, seed=77,
                    width=64, height=64)
    served = Client(server.url).txt2img(prompt, **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt=prompt, **settings))
    uncond, cond = (c["encoder_hidden_states"] for c in local_pipeline.encode_prompts(Txt2ImgRequest(prompt=prompt, **settings)))
    assert cond.shape[1] == uncond.shape[1] == 3 * 77
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    assert "Clip skip: 2" in served.infotexts[0]


def test_120_token_prompt_gives_a_154_token_context(server, local_pipeline):
    prompt = " ".join(["cat"] * 120)
    request = validate(Txt2ImgRequest(prompt=prompt), local_pipeline.spec)
    uncond, cond = (c["encoder_hidden_states"] for c in local_pipeline.encode_prompts(request))
    assert cond.shape[1] == uncond.shape[1] == 154
    served = Client(server.url).txt2img(prompt, steps=3, width=64, height=64, seed=1)
    assert served.images.shape == (1, 64, 64, 3) and served.images.std() > 1


def test_batch_count_continues_the_seeds(server):
    client = Client(server.url)
    counted = client.txt2img("a cat", n_iter=2, batch_size=2, seed=40, steps=3, width=64, height=64)
    single = client.txt2img("a cat", batch_size=4, seed=40, steps=3, width=64, height=64)
    assert counted.seeds == single.seeds == [40, 41, 42, 43]
    assert (counted.images == single.images).all()
    assert [f"Seed: {s}," in t for s, t in zip(counted.seeds, counted.infotexts)] == [True] * 4


def test_served_variation_seeds_match_the_local_runner(server, local_pipeline):
    settings = dict(steps=5, seed=3, subseed=9, subseed_strength=0.4, width=64, height=64, batch_size=2)
    served = Client(server.http_url, "http").txt2img("a cat", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt="a cat", **settings))
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    random_subseed = Client(server.url).txt2img("a cat", steps=2, width=64, height=64, subseed_strength=0.5)
    assert "Variation seed: " in random_subseed.infotexts[0]


def test_a_field_added_to_the_registry_is_served(server, local_pipeline):
    """guidance_rescale was added by declaring it in sdtrt/requests/fields.py and using it in the loop (the
    README's contributor example): the client, the job model's inputs and the infotext carry it with nothing else."""
    settings = dict(sampler="DDIM", steps=8, guidance_scale=20.0, seed=7, width=64, height=64, guidance_rescale=0.9)
    served = Client(server.url).txt2img("a cat", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt="a cat", **settings))
    plain = Client(server.url).txt2img("a cat", **{**settings, "guidance_rescale": 0.0})
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    assert max_diff(served.images, plain.images) > 5 * MAX_PIXEL_DIFF
    assert "Guidance rescale: 0.9" in served.infotexts[0] and "Guidance rescale" not in plain.infotexts[0]


def test_random_seed_is_returned(server):
    client = Client(server.url)
    first = client.txt2img("a cat", seed=-1, steps=3, width=64, height=64)
    again = client.txt2img("a cat", seed=first.seeds[0], steps=3, width=64, height=64)
    assert 0 <= first.seeds[0] < 2**32
    assert (first.images == again.images).all()


GOOD = {"prompt": ("a cat", "BYTES"), "steps": (2, "INT32"), "width": (64, "INT32"), "height": (64, "INT32")}

BAD = [
    ({"width": (500, "INT32")}, "invalid width=500: width must be an integer, a multiple of 8, from 64 to 1024"),
    ({"height": (2048, "INT32")}, "invalid height=2048: height must be an integer, a multiple of 8, from 64 to 1024"),
    ({"steps": (0, "INT32")}, "invalid steps=0: steps must be an integer, from 1 to 150"),
    ({"steps": (151, "INT32")}, "invalid steps=151: steps must be an integer, from 1 to 150"),
    ({"batch_size": (5, "INT32")}, "invalid batch_size=5: batch_size must be an integer, from 1 to 4"),
    ({"guidance_scale": (31.0, "FP32")}, "invalid guidance_scale=31.0: guidance_scale must be a number, from 0 to 30"),
    ({"guidance_scale": (float("nan"), "FP32")}, "invalid guidance_scale=nan"),
    ({"seed": (-2, "INT64")}, "invalid seed=-2: seed must be an integer, from -1 to 4294967295"),
    ({"sampler": ("Euler b", "BYTES")}, "invalid sampler='Euler b': sampler must be one of: 'Euler a', 'Euler'"),
    ({"schedule_type": ("Karras", "BYTES"), "sampler": ("PLMS", "BYTES")},
     "invalid schedule_type='Karras': schedule_type must be one of: 'Automatic', 'Uniform', 'SGM Uniform' with sampler 'PLMS'"),
    ({"schedule_type": ("Polyexponential", "BYTES"), "sampler": ("DDIM", "BYTES")},
     "invalid schedule_type='Polyexponential'"),
    ({"eta": (1.5, "FP32")}, "invalid eta=1.5: eta must be a number, from -1 to 1"),
    ({"clip_skip": (3, "INT32")}, "invalid clip_skip=3: clip_skip must be an integer, from 1 to 2"),
    ({"prompt": (" ".join(["cat"] * 300), "BYTES")}, "invalid prompt='<300 tokens in 4 chunks>': prompt must be at most 3"),
    ({"subseed_strength": (1.5, "FP32")}, "invalid subseed_strength=1.5: subseed_strength must be a number, from 0 to 1"),
    ({"hr_upscaler": ("ESRGAN_4x", "BYTES")}, "invalid hr_upscaler='ESRGAN_4x': hr_upscaler must be one of: 'Latent'"),
    ({"enable_hr": (True, "BOOL"), "hr_scale": (3.0, "FP32"), "width": (512, "INT32")}, "invalid hr_scale=3.0"),
    ({"width": (64.0, "FP32")}, "width"),  # wrong wire type: Triton itself names the input
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("bad,message", BAD, ids=[next(iter(b)) + str(i) for i, (b, _) in enumerate(BAD)])
def test_bad_input_is_refused_by_name_and_the_server_keeps_serving(server, protocol, bad, message):
    with pytest.raises(InferenceServerException) as exc:
        raw_infer(server, {**GOOD, **bad}, protocol)
    assert message in str(exc.value)
    good = raw_infer(server, GOOD, protocol)
    assert good.as_numpy("images").shape == (1, 64, 64, 3)


def test_missing_prompt_is_the_empty_prompt(server):
    seeded = {**GOOD, "seed": (3, "INT64")}
    missing = raw_infer(server, {k: v for k, v in seeded.items() if k != "prompt"}).as_numpy("images")
    empty = raw_infer(server, {**seeded, "prompt": ("", "BYTES")}).as_numpy("images")
    assert (missing == empty).all()


def test_wrong_shape_is_refused_by_name(server):
    prompt = grpcclient.InferInput("prompt", [2], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as exc:
        grpcclient.InferenceServerClient(server.url).infer("txt2img", [prompt])
    assert "prompt" in str(exc.value) and "shape" in str(exc.value)
    assert raw_infer(server, GOOD).as_numpy("seeds").shape == (1,)


def test_client_checks_settings_before_sending(server):
    client = Client(server.url)
    with pytest.raises(InvalidRequest) as exc:
        client.txt2img("a cat", width=65)
    assert exc.value.field == "width" and "multiple of 8" in str(exc.value)
    with pytest.raises(ServerError) as exc:
        Client("127.0.0.1:1").txt2img("a cat")
    assert "sdtrt serve" in str(exc.value)


def test_defaults_come_from_the_spec(server, exported_repo):
    spec = load_spec(exported_repo)
    # Only a prompt and a small size: everything else takes the spec's defaults on the server.
    response = raw_infer(server, {"prompt": ("a cat", "BYTES"), "width": (64, "INT32"), "height": (64, "INT32"),
                                  "steps": (2, "INT32")})
    assert response.as_numpy("images").shape == (spec.field("batch_size").default, 64, 64, 3)
    assert Client(server.url).request("x").width == spec.field("width").default == 512


REQUESTS = [  # 8 different requests: prompts, seeds, sizes, samplers, batch sizes, guidance on and off
    dict(prompt="a red fox", sampler="Euler a", seed=1, width=64, height=64, batch_size=1, guidance_scale=7.0),
    dict(prompt="a blue whale", sampler="DPM++ 2M Karras", seed=2, width=64, height=64, batch_size=2, guidance_scale=5.0),
    dict(prompt="a green frog", sampler="DDIM", seed=3, width=96, height=64, batch_size=1, guidance_scale=7.5),
    dict(prompt="a yellow bird", sampler="Euler", seed=4, width=64, height=80, batch_size=1, guidance_scale=1.0),
    dict(prompt="a purple cat", sampler="Euler a", seed=5, width=64, height=64, batch_size=1, guidance_scale=9.0),
    dict(prompt="an orange car", sampler="DPM++ 2M", seed=6, width=64, height=64, batch_size=1, guidance_scale=7.0),
    dict(prompt="a white house", sampler="PLMS", seed=7, width=80, height=64, batch_size=2, guidance_scale=6.0),
    dict(prompt="a black dog", sampler="Euler a", seed=8, width=64, height=64, batch_size=1, guidance_scale=7.0),
]


def test_concurrent_clients_each_get_their_own_image(server, diffusers_pipe):
    expected = [
        diffusers_images(diffusers_pipe, prompt=r["prompt"], sampler=r["sampler"], steps=8, cfg=r["guidance_scale"],
                         seed=r["seed"], width=r["width"], height=r["height"], batch_size=r["batch_size"])
        for r in REQUESTS
    ]
    grpc, http = Client(server.url, "grpc"), Client(server.http_url, "http")

    def send(i: int):
        r = dict(REQUESTS[i])
        return (grpc if i % 2 else http).txt2img(r.pop("prompt"), steps=8, **r)

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        results = list(pool.map(send, range(len(REQUESTS))))
    for request, result, reference in zip(REQUESTS, results, expected):
        assert result.seeds == [request["seed"] + i for i in range(request["batch_size"])]
        assert max_diff(result.images, reference) <= MAX_PIXEL_DIFF, request


def test_asyncio_client(server):
    client = Client(server.url, "grpc")

    async def main():
        return await asyncio.gather(*(client.atxt2img("a cat", seed=s, steps=3, width=64, height=64) for s in (1, 2, 1)))

    a, b, c = asyncio.run(main())
    assert (a.images == c.images).all() and max_diff(a.images, b.images) > 0
    assert a.seeds == [1] and b.seeds == [2]


def test_served_config_carries_the_spec(server, exported_repo):
    config = httpclient.InferenceServerClient(server.http_url).get_model_config("txt2img")
    served = json.loads(config["parameters"]["sdtrt_spec"]["string_value"])
    assert served == json.loads((exported_repo / "sdtrt_spec.json").read_text())


PICTURE = sample_picture(64, 64)
MASK = sample_mask(64, 64)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_img2img_and_inpainting_match_the_local_runner(server, local_pipeline, protocol):
    client = clients(server)[protocol]
    settings = dict(negative_prompt="blurry", steps=8, seed=12, width=64, height=64, batch_size=2,
                    denoising_strength=0.7, sampler="DPM++ 2M")
    served = client.img2img("a watercolor", Image.fromarray(PICTURE), **settings)
    local = local_pipeline.img2img(Img2ImgRequest(prompt="a watercolor", **settings), PICTURE)
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    assert served.infotexts == local.infotexts
    inpaint = dict(settings, mask_blur=3, inpaint_full_res=True, inpaint_full_res_padding=8)
    served = client.img2img("a red door", PICTURE, MASK, **inpaint)
    local = local_pipeline.img2img(Img2ImgRequest(prompt="a red door", **inpaint), PICTURE, MASK)
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    assert "Mask blur: 3, Inpaint area: Only masked" in served.infotexts[0]


@pytest.mark.parametrize("upscaler", ["Latent (bicubic)", "Lanczos"])
def test_served_hires_fix_matches_the_local_runner(server, local_pipeline, upscaler):
    settings = dict(steps=6, seed=23, width=64, height=64, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler,
                    denoising_strength=0.55)
    served = Client(server.url).txt2img("a castle", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt="a castle", **settings))
    assert served.images.shape == (1, 96, 96, 3)
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF


def test_img2img_without_an_image_is_refused_by_name(server):
    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as exc:
        grpcclient.InferenceServerClient(server.url).infer("img2img", [prompt])
    assert "invalid init_image=None: init_image must be an H x W x 3 uint8 RGB picture" in str(exc.value)
    assert Client(server.url).img2img("x", PICTURE, steps=2, width=64, height=64).images.shape == (1, 64, 64, 3)


def test_each_controlled_job_has_its_own_connection_and_reads_its_progress_there(server):
    """Behind a Kubernetes Service every new TCP connection may reach another Triton pod: a job sent with a
    JobControl gets a connection of its own (so jobs spread over the pods) and its progress is read over that
    same connection (progress lives in the memory of the server that runs the job)."""
    import threading
    import time

    import psutil

    from sdtrt.client import JobControl

    client = Client(server.url)
    port = int(server.url.rsplit(":", 1)[1])
    controls = [JobControl(), JobControl()]
    workers = [threading.Thread(target=client.txt2img, args=("a slow one",),
                                kwargs=dict(steps=40, width=512, height=512, seed=i, control=c))
               for i, c in enumerate(controls)]
    for worker in workers:
        worker.start()
    seen_ports: set[int] = set()
    progressed = [False, False]
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        seen_ports |= {c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
                       if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}
        for i, control in enumerate(controls):
            progressed[i] |= client.progress(control.request_id) is not None
        time.sleep(0.1)
    for worker in workers:
        worker.join(120)
    assert all(progressed)
    assert len(seen_ports) >= 2, seen_ports  # one connection per job (and none shared between them)
    assert not client._job_connections  # each closed with its job


def test_progress_asked_as_the_job_closes_its_connection_is_answered_on_the_shared_one(server):
    """The race a loaded machine showed: progress() picks the job's own connection, the job ends and closes it,
    the question fails with "Channel closed". The job's connection is replaced here by one that does exactly
    that when asked (the server is real)."""
    client = Client(server.url)
    real = client._new_client(own_connection=True)

    class ClosesWhenAsked:
        def infer(self, *args, **kwargs):
            client._job_connections.pop("ended-job", None)
            real.close()
            return real.infer(*args, **kwargs)

    client._job_connections["ended-job"] = ClosesWhenAsked()
    assert client.progress("ended-job") is None  # an id the server does not know: no progress, and no error
