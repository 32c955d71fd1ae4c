"""A1111's Refiner and Hires checkpoint: another model of the server takes over part of a request, as A1111 swaps
checkpoints mid-generation, in-process and through the gateway.

The reference is A1111 1.10's code path written out on diffusers' networks and k-diffusion's sampler (the
CompVis denoiser and CFG of tests/test_a1111_exact.py): apply_refiner switches the denoiser's model, and the
conditioning to the refiner's, at the first call whose share of sampling done, (999 - the training timestep
nearest the sigma) / 1000, reaches refiner_switch_at, and the last loaded model decodes; with the hires fix the
refiner acts in the second pass (A1111's default "second pass"); a hires checkpoint runs the whole second pass.
The second model is the default model with its U-Net, text encoder and VAE decoder perturbed, so that each of
its networks shows in the picture."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from reference import MAX_PIXEL_DIFF, A1111Schedules, k_sampling, max_diff
from servers import triton_on
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.errors import InvalidRequest
from sdtrt.pipeline.local import LocalPipeline
from sdtrt.requests.request import Txt2ImgRequest
from test_a1111_exact import ImageRng, TorchHijack, a1111_text

REQUEST = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", steps=8, guidance_scale=7.0, seed=5,
               width=64, height=64, sampler="Euler a", k_diffusion=True)


def perturbed(model, out, seed: int):
    """A copy of the model whose U-Net, text encoder and VAE weights differ (another "checkpoint")."""
    shutil.copytree(model, out)
    generator = torch.Generator().manual_seed(seed)
    for part, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                       ("vae", "diffusion_pytorch_model.safetensors")):
        weights = load_file(str(out / part / file))
        changed = {k: v * (1 + 0.25 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v
                   for k, v in weights.items()}
        save_file(changed, str(out / part / file))
    return out


@pytest.fixture(scope="module")
def models(default_model, tmp_path_factory):
    """The default model as "base", a perturbed copy as "refiner", and one with another noise schedule."""
    root = tmp_path_factory.mktemp("refiner")
    other = perturbed(default_model, root / "refiner", 3)
    shifted = shutil.copytree(default_model, root / "shifted")
    config = shifted / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_end": 0.02}))
    return {"base": default_model, "refiner": other, "shifted": shifted}


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory):
    from sdtrt.export import export_model

    out = tmp_path_factory.mktemp("refiner-repo") / "repo"
    for name, path in models.items():
        export_model(path, out, progress=False, report=lambda *_: None, name=name)
    return out


@pytest.fixture(scope="module")
def pipes(models):
    from diffusers import StableDiffusionPipeline

    loaded = {}
    for name in ("base", "refiner"):
        pipe = StableDiffusionPipeline.from_pretrained(str(models[name]), local_files_only=True, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        loaded[name] = pipe
    return loaded


@pytest.fixture(scope="module")
def local(repo):
    return LocalPipeline(repo, model="base")


@torch.no_grad()
def a1111_refined(pipes, switch_at: float, hires_model: str | None = None, refiner: str | None = "refiner",
                  hires: bool = False, mode: str = "second pass", by_steps: bool = False) -> np.ndarray:
    """Euler a as A1111 runs it (REQUEST's settings), the denoiser's model swapped as apply_refiner swaps it: in
    the passes hires_fix_refiner_pass (``mode``) allows, at the share of sampling done by noise level or, with
    ``by_steps`` (refiner_switch_by_sample_steps), the denoiser's step / its total_steps; the second pass on the
    hires checkpoint or the request's (A1111's reload_model_weights(info=hr_checkpoint_info))."""
    sampling, r = k_sampling(), REQUEST
    schedules = A1111Schedules(pipes["base"].scheduler.config)
    texts = {name: (a1111_text(p, r["prompt"], 1), a1111_text(p, r["negative_prompt"], 1)) for name, p in pipes.items()}
    state = {"model": "base"}

    def run(x, sigmas, rng, refine: bool):
        calls = [0]

        def model(x, sigma, **_):
            t = schedules.sigma_to_t(float(sigma[0]))
            nearest = int(torch.argmin(torch.abs(schedules.model_sigmas - sigma.max())))  # apply_refiner's
            done = calls[0] / (len(sigmas) - 1) if by_steps else (999 - nearest) / 1000
            calls[0] += 1
            if refine and refiner and done >= switch_at:
                state["model"] = refiner
            pipe, (cond, uncond) = pipes[state["model"]], texts[state["model"]]
            x_in, s_in = torch.cat([x, x]), torch.cat([sigma, sigma])
            eps = pipe.unet(x_in / (s_in ** 2 + 1).sqrt().reshape(-1, 1, 1, 1), t.float().repeat(2),
                            encoder_hidden_states=torch.cat([cond, uncond])).sample
            c, u = (x_in - eps * s_in.reshape(-1, 1, 1, 1)).chunk(2)
            return u + (c - u) * r["guidance_scale"]

        original, sampling.torch = sampling.torch, TorchHijack(rng)
        try:
            return sampling.sample_euler_ancestral(model, x, sigmas.float(), disable=True, eta=1.0, s_noise=1.0)
        finally:
            sampling.torch = original

    sigmas = schedules.sigmas("Uniform", r["steps"])
    rng = ImageRng(r["seed"], False, 0)
    latents = run(rng.next((4, 8, 8))[None] * sigmas[0].float(), sigmas, rng,
                  refine=not hires or mode != "second pass")
    if hires:  # Latent x1.5, strength 0.6, the second pass's own ImageRNG; the hires checkpoint loaded before it
        latents = torch.nn.functional.interpolate(latents, size=(12, 12), mode="bilinear", antialias=False)
        state["model"] = hires_model or "base"
        total, t_enc = int(r["steps"] / 0.6), r["steps"] - 1
        sigma_sched = schedules.sigmas("Uniform", total)[total - t_enc - 1:]
        rng = ImageRng(r["seed"], False, 0)
        latents = run(latents + rng.next((4, 12, 12))[None] * sigma_sched[0].float(), sigma_sched, rng,
                      refine=mode != "first pass")
    pipe = pipes[state["model"]]
    image = torch.clamp((pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample + 1) / 2, 0, 1)[0]
    return (255.0 * image.permute(1, 2, 0).numpy()).astype(np.uint8)[None]


HIRES = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.6, hr_upscaler="Latent")


@pytest.mark.parametrize("switch_at", [0.3, 0.7])
def test_the_refiner_takes_over_as_a1111s_does(local, pipes, switch_at):
    result = local.txt2img(Txt2ImgRequest(**REQUEST, refiner_checkpoint="refiner", refiner_switch_at=switch_at))
    expected = a1111_refined(pipes, switch_at)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert max_diff(result.images, a1111_refined(pipes, switch_at, refiner=None)) > MAX_PIXEL_DIFF  # it did switch
    assert f"Refiner: refiner, Refiner switch at: {switch_at}" in result.infotexts[0]


def test_a_refiner_that_never_takes_over_changes_nothing(local):
    """A1111's share of sampling done never reaches 1 ((999 - 0) / 1000): switch_at 1 keeps the model's picture."""
    plain = local.txt2img(Txt2ImgRequest(**REQUEST))
    never = local.txt2img(Txt2ImgRequest(**REQUEST, refiner_checkpoint="refiner", refiner_switch_at=1.0))
    assert (plain.images == never.images).all()


def test_with_the_hires_fix_the_refiner_acts_in_the_second_pass(local, pipes):
    result = local.txt2img(Txt2ImgRequest(**REQUEST, **HIRES, refiner_checkpoint="refiner", refiner_switch_at=0.6))
    assert max_diff(result.images, a1111_refined(pipes, 0.6, hires=True)) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("mode", ["first pass", "both passes"])
def test_the_hires_refiner_pass_option_picks_the_passes_it_acts_in(local, pipes, mode):
    """A1111's hires_fix_refiner_pass: the first pass switches too; the second starts on the request's model."""
    settings = dict(**REQUEST, **HIRES, refiner_checkpoint="refiner", refiner_switch_at=0.5, hires_refiner_pass=mode)
    result = local.txt2img(Txt2ImgRequest(**settings))
    assert max_diff(result.images, a1111_refined(pipes, 0.5, hires=True, mode=mode)) <= MAX_PIXEL_DIFF
    assert max_diff(result.images, a1111_refined(pipes, 0.5, hires=True)) > MAX_PIXEL_DIFF
    assert f"Hires refiner: {mode}, Refiner: refiner" in result.infotexts[0]


def test_the_switch_counted_in_sampling_steps(local, pipes):
    """A1111's refiner_switch_by_sample_steps: the denoiser's step / total_steps instead of the noise level."""
    # 8 steps: by noise level the second call is 0.143 done and switches, by steps it is 1/8 and does not
    result = local.txt2img(Txt2ImgRequest(**REQUEST, refiner_checkpoint="refiner", refiner_switch_at=0.14,
                                          refiner_switch_by_steps=True))
    assert max_diff(result.images, a1111_refined(pipes, 0.14, by_steps=True)) <= MAX_PIXEL_DIFF
    assert max_diff(result.images, a1111_refined(pipes, 0.14)) > MAX_PIXEL_DIFF
    assert "Refiner switch by sampling steps: True" in result.infotexts[0]


def test_a_hires_checkpoint_runs_the_second_pass(local, pipes):
    result = local.txt2img(Txt2ImgRequest(**REQUEST, **HIRES, hr_checkpoint="refiner"))
    assert max_diff(result.images, a1111_refined(pipes, 1.0, hires_model="refiner", refiner=None,
                                                 hires=True)) <= MAX_PIXEL_DIFF
    assert "Hires checkpoint: refiner" in result.infotexts[0]


def test_a_model_of_another_schedule_or_unknown_is_refused_naming_the_field(local):
    with pytest.raises(InvalidRequest) as exc:
        local.txt2img(Txt2ImgRequest(**REQUEST, refiner_checkpoint="shifted"))
    assert exc.value.field == "refiner_checkpoint" and "beta_end" in str(exc.value)
    with pytest.raises(InvalidRequest) as exc:
        local.txt2img(Txt2ImgRequest(**REQUEST, **HIRES, hr_checkpoint="nowhere"))
    assert exc.value.field == "hr_checkpoint" and "'refiner'" in str(exc.value)


def test_the_gateway_takes_a1111s_refiner_and_hires_checkpoint(repo, local, tmp_path):
    """By A1111's names (title or file name), served by Triton: the in-process runner's pictures."""
    with triton_on(repo, tmp_path) as triton:
        api = TestClient(create_app(Client(triton.url)))
        body = {"prompt": REQUEST["prompt"], "negative_prompt": REQUEST["negative_prompt"], "steps": 8, "seed": 5,
                "width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7,
                "override_settings": {"sd_model_checkpoint": "base"}}
        refined = api.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "refiner.safetensors",
                                                      "refiner_switch_at": 0.3})
        assert refined.status_code == 200, refined.text[:500]
        expected = local.txt2img(Txt2ImgRequest(**REQUEST, refiner_checkpoint="refiner", refiner_switch_at=0.3))
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(refined.json()["images"][0]))).convert("RGB"))
        assert (picture == expected.images[0]).all()
        assert "Refiner: refiner" in json.loads(refined.json()["info"])["infotexts"][0]
        hires = api.post("/sdapi/v1/txt2img", json={**body, "enable_hr": True, "hr_scale": 1.5,
                                                    "denoising_strength": 0.6, "hr_upscaler": "Latent",
                                                    "hr_checkpoint_name": "refiner"})
        assert hires.status_code == 200, hires.text[:500]
        expected = local.txt2img(Txt2ImgRequest(**REQUEST, **HIRES, hr_checkpoint="refiner"))
        picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(hires.json()["images"][0]))).convert("RGB"))
        assert (picture == expected.images[0]).all()
        other = api.post("/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": "sd_xl_refiner_1.0"})
        assert other.status_code == 422 and other.json()["detail"][0]["loc"] == ["body", "refiner_checkpoint"]


def test_the_switch_hands_each_model_its_own_conditioning_and_stays():
    """The switching U-Net by itself (the pictures above barely show the tiny model's text conditioning): the
    model's context until (999 - timestep) / 1000 reaches switch_at, then the refiner's, even if a later call's
    timestep were higher (A1111 loads the refiner once)."""
    from sdtrt.pipeline.jobs import REFINER, SwitchingUNet

    seen, switched = [], []

    def unet(name):
        return lambda sample, timestep, context: seen.append((name, float(timestep[0]), context["c"].item())) or sample

    switch = SwitchingUNet(unet("own"), unet("refiner"), 0.5, lambda: switched.append(True))
    context = {"c": torch.tensor(1.0), REFINER + "c": torch.tensor(2.0)}
    for t in (999.0, 700.0, 499.75, 499.0, 800.0):
        switch(torch.zeros(1), torch.tensor([t]), context)
    assert seen == [("own", 999.0, 1.0), ("own", 700.0, 1.0), ("own", 499.75, 1.0), ("refiner", 499.0, 2.0),
                    ("refiner", 800.0, 2.0)]
    assert switched == [True]


def test_the_refiner_runs_on_its_own_conditioning(local):
    """Once it takes over, the refiner's U-Net gets the refiner's text encoder's conditioning (the tiny models'
    pictures barely show it, so the calls are watched)."""
    from sdtrt.pipeline import jobs

    plan = local.plan(Txt2ImgRequest(**REQUEST, refiner_checkpoint="refiner", refiner_switch_at=0.3))
    refiner, seen = local.other("refiner"), []

    class Watched:
        def __init__(self, nets):
            self.nets, self.device = nets, nets.device

        def __getattr__(self, name):
            return getattr(self.nets, name)

        def unet(self, sample, timestep, context):
            seen.append(context["encoder_hidden_states"])
            return self.nets.unet(sample, timestep, context)

    jobs.run(plan, local.networks(plan), others=lambda other: Watched(refiner.networks(other)))
    uncond, cond = refiner.networks(plan.refiner).encode_texts(plan.refiner.texts[0], 1)
    theirs = torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])
    uncond, cond = local.networks(plan).encode_texts(plan.texts[0], 1)
    own = torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])
    assert seen and all(torch.equal(context, theirs) for context in seen)
    assert not torch.allclose(own, theirs)  # the refiner's text encoder is another one
