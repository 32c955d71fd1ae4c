"""A1111's k-diffusion samplers, each against k-diffusion itself driving diffusers' networks.

The reference is built here, from A1111's published code paths (modules/sd_samplers_kdiffusion.py): k-diffusion's
own sampling function, given A1111's sigmas (tests/reference.py restates A1111's schedule types), A1111's
arguments (eta, churn, noise multiplier, a Brownian tree per seed for the SDE samplers), its step noise (each
image's generator after the starting noise, or seed + ENSD) and its CFG denoiser around diffusers' U-Net (the
CompVis wrapper's input scaling and fractional timesteps, written out below). sdtrt runs the same request through
its exported ONNX networks; the pictures must agree within MAX_PIXEL_DIFF.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from reference import MAX_PIXEL_DIFF, A1111Schedules, k_sampling, max_diff
from sdtrt.client import Client
from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.philox import nv_randn
from sdtrt.contract.samplers import SAMPLERS
from sdtrt.requests.request import Txt2ImgRequest

# A1111 1.10's k-diffusion samplers: function, Automatic schedule, discard penultimate sigma, Brownian noise, the
# extra arguments it hands the function.
CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
A1111_K = {
    "Euler a": ("sample_euler_ancestral", "Uniform", False, False, ("eta",)),
    "Euler": ("sample_euler", "Uniform", False, False, CHURN),
    "LMS": ("sample_lms", "Uniform", False, False, ()),
    "Heun": ("sample_heun", "Uniform", False, False, CHURN),
    "DPM2": ("sample_dpm_2", "Karras", True, False, CHURN),
    "DPM2 a": ("sample_dpm_2_ancestral", "Karras", True, False, ("eta", "s_noise")),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "Karras", False, False, ("eta", "s_noise")),
    "DPM++ 2M": ("sample_dpmpp_2m", "Karras", False, False, ()),
    "DPM++ SDE": ("sample_dpmpp_sde", "Karras", False, True, ("eta", "s_noise")),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "Exponential", False, True, ("eta", "s_noise")),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", "Exponential", False, True, ("eta", "s_noise")),  # solver: heun
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "Exponential", True, True, ("eta", "s_noise")),
    "DPM fast": ("sample_dpm_fast", "Uniform", False, False, ("eta", "s_noise")),
    "DPM adaptive": ("sample_dpm_adaptive", "Uniform", False, False, ("eta", "s_noise")),
    "Restart": ("sample_restart", "Karras", False, False, ()),  # A1111's own function: restart_reference below
}
SECOND_ORDER_A1111 = ("DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a", "Restart")  # its second_order option
PROMPT, NEGATIVE, SEED = "a small green square at the top left on a white background", "blurry", 11


class _Randn:
    """A1111's TorchHijack: k-diffusion's torch.randn_like draws from the image's generator."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x, *args, **kwargs):
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


def restart_reference(sampling, model, x, sigmas, randn):
    """A1111's restart_sampler (modules/sd_samplers_extra.py) as its published code path runs it, with k-diffusion's
    own sample_heun for each descent (Heun steps, Euler into 0: A1111's heun_step): from 20 steps, a Karras
    schedule of steps - restarts x their steps; after the descent reaches the sigma nearest 0.1, each restart
    noises back up to the sigma nearest 2 and descends a Karras segment of its steps + 1 sigmas, its last dropped."""
    def heun(x, segment):
        original, sampling.torch = sampling.torch, torch  # sample_heun draws (unused) churn noise each step
        try:
            return sampling.sample_heun(model, x, segment, disable=True)
        finally:
            sampling.torch = original

    steps = len(sigmas) - 1
    if steps < 20:
        return heun(x, sigmas)
    restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    sigmas = sampling.get_sigmas_karras(steps - restart_steps * times, sigmas[-2].item(), sigmas[0].item())
    low, high = int(torch.argmin(abs(sigmas - 0.1))), int(torch.argmin(abs(sigmas - 2)))
    x = heun(x, sigmas[:low + 1])
    segment = sampling.get_sigmas_karras(restart_steps + 1, sigmas[low].item(), sigmas[high].item())[:-1]
    for _ in range(times):
        x = x + randn.randn_like(x) * (segment[0] ** 2 - sigmas[low] ** 2) ** 0.5
        x = heun(x, segment)
    return heun(x, sigmas[low:])


class _NvRandn(_Randn):
    """A1111's TorchHijack with its NV source: each draw the next of the image's philox generator (A1111's
    rng_philox.Generator: one offset per draw), the numbers an NVIDIA GPU gives (nv_randn is checked against
    CUDA's in tests/test_a1111_seeds.py)."""

    def __init__(self, seed: int, offset: int):
        self.seed, self.offset = seed, offset

    def randn_like(self, x, *args, **kwargs):
        self.offset += 1
        return torch.from_numpy(nv_randn(self.seed, tuple(x.shape), self.offset - 1))


@torch.no_grad()
def k_reference(pipe, sampler: str, steps: int, cfg: float = 7.0, schedule: str = "Automatic", eta: float = 1.0,
                ensd: int = 0, s_min_uncond: float = 0.0, init: np.ndarray | None = None, strength: float = 0.0,
                nv: bool = False, noise_multiplier: float = 1.0, skip_early: float = 0.0, uncond_all: bool = False,
                options: dict | None = None, **extra) -> np.ndarray:
    """One 64x64 image as A1111 samples it with k-diffusion, on diffusers' U-Net and VAE; with ``init`` (a
    picture), img2img as A1111's sample_img2img runs it: of the schedule for ``steps``, the last
    int(strength * steps) + 1 steps, from the picture's latents plus noise at the first of them. ``options``: A1111's
    schedule and noise-level options (its get_sigmas, apply_alpha_schedule_override, sample and sample_img2img):
    the range, rho, alpha and beta and old_karras of A1111Schedules.sigmas, zero_snr, downcast, discard, sgm,
    extra_noise."""
    sampling = k_sampling()
    function, automatic, discard, brownian, takes = A1111_K[sampler]
    options = dict(options or {})
    a1111 = A1111Schedules(pipe.scheduler.config, options.pop("zero_snr", False), options.pop("downcast", False))
    discard = discard or options.pop("discard", False)
    sgm, extra_noise = options.pop("sgm", False), options.pop("extra_noise", 0.0)
    n = steps + 1 if discard else steps
    name = automatic if schedule == "Automatic" else schedule
    sigmas = a1111.sigmas(name, n, **options).float()  # (Uniform: k-diffusion's get_sigmas, whatever the range)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    generator = torch.Generator().manual_seed(SEED)
    if init is None and nv:  # A1111's ImageRNG: the starting noise is the generator's first draw
        x = torch.from_numpy(nv_randn(SEED, (1, 4, 8, 8))) * sigmas[0]
    elif init is None:  # (A1111's SGM noise multiplier: SGM's samplers' starting scale)
        x = torch.randn((1, 4, 8, 8), generator=generator) * (torch.sqrt(1 + sigmas[0] ** 2) if sgm else sigmas[0])
    else:  # the picture's latents drawn as diffusers' img2img draws them (generator first), then the noise
        picture = torch.from_numpy(init).permute(2, 0, 1)[None].float() / 127.5 - 1
        latents = pipe.vae.encode(picture).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
        schedule_sigmas, sigmas = sigmas, sigmas[steps - int(min(strength, 0.999) * steps) - 1:]
        noise = torch.randn((1, 4, 8, 8), generator=generator) * noise_multiplier
        x = latents + noise * sigmas[0] + noise * extra_noise
    if ensd:
        generator = torch.Generator().manual_seed(SEED + ensd)
    calls = [0]

    def model(x, sigma, **_):  # A1111's CFGDenoiser around k-diffusion's CompVisDenoiser
        # A1111 1.10's CFGDenoiser: skip_early_cond over self.step / total_steps (launch_sampling's steps, twice
        # for its second-order samplers), else NGMS every other call (or every call: s_min_uncond_all)
        total = (steps if init is None else len(sigmas) - 1) * (2 if sampler in SECOND_ORDER_A1111 else 1)
        if skip_early and calls[0] / total <= skip_early:
            skip = True
        else:
            skip = (calls[0] % 2 == 1 or uncond_all) and s_min_uncond > 0 and float(sigma[0]) < s_min_uncond
        calls[0] += 1
        rows = 1 if skip else 2
        x_in, s_in = torch.cat([x] * rows), torch.cat([sigma] * rows)
        t = torch.stack([a1111.sigma_to_t(float(s)).reshape(()) for s in s_in]).float()
        c_in = (1 / (s_in ** 2 + 1) ** 0.5).reshape(-1, 1, 1, 1)
        context = cond if skip else torch.cat([cond, uncond])
        eps = pipe.unet(x_in * c_in, t, encoder_hidden_states=context).sample
        denoised = x_in - eps * s_in.reshape(-1, 1, 1, 1)
        if skip:
            return denoised
        c, u = denoised.chunk(2)
        return u + (c - u) * cfg

    values = {"eta": eta, "s_noise": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), **extra}
    kwargs = {k: values[k] for k in takes}
    if function in ("sample_dpm_fast", "sample_dpm_adaptive"):
        kwargs.update(sigma_min=a1111.sigma_min, sigma_max=a1111.sigma_max)
        if function == "sample_dpm_fast":
            kwargs["n"] = steps
    else:
        kwargs["sigmas"] = sigmas
    if sampler == "DPM++ 2M SDE Heun":
        kwargs["solver_type"] = "heun"
    if brownian:  # over the whole schedule (A1111's create_noise_sampler), img2img's too
        whole = sigmas if init is None else schedule_sigmas
        positive = whole[whole > 0]
        kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=[SEED])
    randn = (_NvRandn(SEED + ensd, 0) if ensd else _NvRandn(SEED, 1)) if nv else _Randn(generator)
    if not brownian and "eta" in takes:
        kwargs["noise_sampler"] = lambda sigma, sigma_next: randn.randn_like(x)
    original = sampling.torch
    sampling.torch = randn
    try:
        if function == "sample_restart":
            latents = restart_reference(sampling, model, x, sigmas, randn)
        else:
            latents = getattr(sampling, function)(model, x, disable=True, **kwargs)
    finally:
        sampling.torch = original
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (pipe.image_processor.postprocess(image, output_type="np")[0:1] * 255).round().astype(np.uint8)


def sdtrt_image(local_pipeline, sampler: str, steps: int, **settings) -> np.ndarray:
    request = Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, width=64, height=64,
                             sampler=sampler, k_diffusion=True, **settings)
    return local_pipeline.txt2img(request).images


def test_the_reference_covers_every_k_diffusion_sampler():
    """Every sampler with a k-diffusion function (the combined "... Karras" names are their base on Karras)."""
    assert set(A1111_K) == {name for name, s in SAMPLERS.items() if s.k_function and s.schedule == "Automatic"}
    assert all(SAMPLERS[name].k_function == function for name, (function, *_) in A1111_K.items())


@pytest.mark.parametrize("sampler", list(A1111_K))
def test_each_k_sampler_matches_k_diffusion_driving_the_same_networks(sampler, local_pipeline, diffusers_pipe):
    steps = 8
    expected = k_reference(diffusers_pipe, sampler, steps)
    assert max_diff(sdtrt_image(local_pipeline, sampler, steps), expected) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("sampler, settings", [
    ("Euler a", {}), ("Euler a", {"eta_noise_seed_delta": 31337}), ("DPM2 a", {}), ("Restart", {}),
    ("Euler", {"s_churn": 2.0}), ("DPM fast", {}),
])
def test_nv_step_noise_is_a1111s(sampler, settings, local_pipeline, diffusers_pipe):
    """With the NV source A1111 draws the step noise from each image's NV generator too, continued after the
    starting noise (ENSD: a fresh one for seed + delta); sdtrt's k-diffusion path does the same."""
    steps = 20 if sampler == "Restart" else 8  # Restart adds noise only from 20 steps
    reference = {"ensd": settings["eta_noise_seed_delta"]} if "eta_noise_seed_delta" in settings else settings
    expected = k_reference(diffusers_pipe, sampler, steps, nv=True, **reference)
    result = sdtrt_image(local_pipeline, sampler, steps, randn_source="NV", **settings)
    assert max_diff(result, expected) <= MAX_PIXEL_DIFF
    assert max_diff(result, k_reference(diffusers_pipe, sampler, steps, **reference)) > MAX_PIXEL_DIFF  # not CPU's


@pytest.mark.parametrize("steps", [20, 36])
def test_restart_restarts_as_a1111s_does(steps, local_pipeline, diffusers_pipe):
    """From 20 steps Restart redraws its schedule and climbs back once (from 36: twice), with fresh noise."""
    expected = k_reference(diffusers_pipe, "Restart", steps)
    assert max_diff(sdtrt_image(local_pipeline, "Restart", steps), expected) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("schedule", ["Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                                      "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"])
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2S a"])
def test_every_schedule_type_with_k_samplers(sampler, schedule, local_pipeline, diffusers_pipe):
    steps = 7
    expected = k_reference(diffusers_pipe, sampler, steps, schedule=schedule)
    result = sdtrt_image(local_pipeline, sampler, steps, schedule_type=schedule)
    assert max_diff(result, expected) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("sampler, settings, reference", [
    ("Euler a", dict(eta=0.4), dict(eta=0.4)),
    ("DPM++ 2M SDE", dict(eta=0.6, s_noise=0.9), dict(eta=0.6, s_noise=0.9)),
    ("Euler", dict(s_churn=3.0, s_tmin=0.5, s_tmax=8.0, s_noise=1.05),
     dict(s_churn=3.0, s_tmin=0.5, s_tmax=8.0, s_noise=1.05)),
    ("Euler a", dict(eta_noise_seed_delta=31337, k_diffusion=True), dict(ensd=31337)),
    ("DPM++ 2M", dict(s_min_uncond=4.0), dict(s_min_uncond=4.0)),
    ("DPM++ 2M", dict(s_min_uncond=4.0, s_min_uncond_all=True), dict(s_min_uncond=4.0, uncond_all=True)),
    ("Euler a", dict(skip_early_cond=0.3), dict(skip_early=0.3)),
    ("Heun", dict(skip_early_cond=0.3), dict(skip_early=0.3)),
])
def test_a1111s_sampler_settings_as_k_diffusion_takes_them(sampler, settings, reference, local_pipeline,
                                                           diffusers_pipe):
    steps = 8
    expected = k_reference(diffusers_pipe, sampler, steps, **reference)
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps,
                                                   width=64, height=64, sampler=sampler, **settings))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    plain = sdtrt_image(local_pipeline, sampler, steps)
    assert (plain != result.images).any()  # the setting changed the picture


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2S a", "DPM++ 2M SDE"])
def test_img2img_runs_a1111s_steps_of_the_schedule(sampler, local_pipeline, diffusers_pipe):
    from reference import sample_picture
    from sdtrt.requests.request import Img2ImgRequest

    picture, steps, strength = sample_picture(64, 64), 10, 0.6
    expected = k_reference(diffusers_pipe, sampler, steps, init=picture, strength=strength)
    request = Img2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, width=64, height=64,
                             sampler=sampler, k_diffusion=True, denoising_strength=strength)
    done = []
    result = local_pipeline.generate(local_pipeline.plan(request, init_image=picture),
                                     on_step=lambda step, total, _: done.append(total))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert done[-1] == int(strength * steps) + 1  # A1111 runs one step more than diffusers' img2img


@pytest.mark.parametrize("sampler, schedule, settings, options", [
    ("Euler", "Karras", dict(sigma_min=0.1, sigma_max=10.0, rho=5.0), dict(sigma_min=0.1, sigma_max=10.0, rho=5.0)),
    ("Euler", "Beta", dict(beta_dist_alpha=0.4, beta_dist_beta=0.8), dict(alpha=0.4, beta=0.8)),
    ("DPM++ 2M", "Automatic", dict(use_old_karras_scheduler_sigmas=True), dict(old_karras=True)),
    ("Euler", "Normal", dict(sigma_max=8.0), dict(sigma_max=8.0)),
    ("Euler", "KL Optimal", dict(sigma_max=5.0), dict(sigma_max=5.0)),
    ("Euler", "Polyexponential", dict(rho=2.0), dict(rho=2.0)),
    ("Euler a", "Automatic", dict(always_discard_next_to_last_sigma=True), dict(discard=True)),
    ("Euler", "Karras", dict(sd_noise_schedule="Zero Terminal SNR"), dict(zero_snr=True)),
])
def test_a1111s_schedule_options_as_its_get_sigmas_takes_them(sampler, schedule, settings, options, local_pipeline,
                                                              diffusers_pipe):
    """A1111's options for its samplers' sigmas and noise levels, each against k_reference given the same option
    (A1111Schedules restating A1111's get_sigmas and apply_alpha_schedule_override)."""
    steps = 8
    expected = k_reference(diffusers_pipe, sampler, steps, schedule=schedule, options=options)
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps,
                                                   width=64, height=64, sampler=sampler, schedule_type=schedule,
                                                   **settings))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    plain = sdtrt_image(local_pipeline, sampler, steps, schedule_type=schedule)
    assert max_diff(plain, expected) > MAX_PIXEL_DIFF  # the option changed the picture


def test_sgm_noise_multiplier_scales_txt2imgs_start(local_pipeline, diffusers_pipe):
    """sqrt(1 + sigma^2) instead of sigma: visible where the schedule starts low (A1111's sigma_max option)."""
    steps, low = 8, dict(sigma_max=1.5)
    expected = k_reference(diffusers_pipe, "Euler", steps, schedule="Karras", options=dict(sgm=True, **low))
    settings = dict(schedule_type="Karras", sigma_max=1.5)
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps,
                                                   width=64, height=64, sampler="Euler", sgm_noise_multiplier=True,
                                                   **settings))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert max_diff(sdtrt_image(local_pipeline, "Euler", steps, **settings), expected) > MAX_PIXEL_DIFF
    assert "SGM noise multiplier: True" in result.infotexts[0] and "Schedule max sigma: 1.5" in result.infotexts[0]


def test_downcast_noise_levels_are_a1111s_fp16_ones(local_pipeline, diffusers_pipe):
    """A1111's use_downcasted_alpha_bar computes its sigmas from fp16 noise levels: a rounding change, under the
    picture tolerance, checked on the levels themselves too."""
    from sdtrt.contract.samplers import SamplerSettings
    from sdtrt.pipeline.ksampling import sampling_alphas_cumprod

    config = diffusers_pipe.scheduler.config
    downcast = sampling_alphas_cumprod(config, SamplerSettings(use_downcasted_alpha_bar=True))
    exact = sampling_alphas_cumprod(config, SamplerSettings())
    assert downcast.dtype == torch.float16 and torch.equal(downcast, exact.half())
    assert 1e-4 < float(((downcast.float() - exact) / exact).abs().max()) < 1e-3
    expected = k_reference(diffusers_pipe, "Euler a", 8, options=dict(downcast=True))
    result = sdtrt_image(local_pipeline, "Euler a", 8, use_downcasted_alpha_bar=True)
    assert max_diff(result, expected) <= MAX_PIXEL_DIFF


def test_extra_noise_is_added_to_img2imgs_start_and_written(local_pipeline, diffusers_pipe):
    """A1111's img2img_extra_noise: sample_img2img adds the same noise again, times the option."""
    from reference import sample_picture
    from sdtrt.requests.request import Img2ImgRequest

    picture, steps, strength = sample_picture(64, 64), 10, 0.6
    expected = k_reference(diffusers_pipe, "Euler", steps, init=picture, strength=strength,
                           options=dict(extra_noise=0.5))
    request = Img2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, width=64, height=64,
                             sampler="Euler", denoising_strength=strength, img2img_extra_noise=0.5)
    result = local_pipeline.img2img(request, picture)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert max_diff(result.images, k_reference(diffusers_pipe, "Euler", steps, init=picture,
                                               strength=strength)) > MAX_PIXEL_DIFF
    assert "Extra noise: 0.5" in result.infotexts[0]


def test_img2img_fix_steps_runs_the_steps_asked_of_a_stretched_schedule(local_pipeline, diffusers_pipe):
    """A1111's option img2img_fix_steps (setup_img2img_steps): int(steps / strength) steps of schedule, the last
    ``steps`` of them run; k_reference's own img2img of that schedule with a strength that keeps as many."""
    from reference import sample_picture
    from sdtrt.requests.request import Img2ImgRequest

    picture, steps, strength = sample_picture(64, 64), 6, 0.6  # 10 steps of schedule, sigmas[4:]
    expected = k_reference(diffusers_pipe, "Euler", 10, init=picture, strength=0.5)
    request = Img2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, width=64, height=64,
                             sampler="Euler", k_diffusion=True, denoising_strength=strength, img2img_fix_steps=True)
    done = []
    result = local_pipeline.generate(local_pipeline.plan(request, init_image=picture),
                                     on_step=lambda step, total, _: done.append(total))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF and done[-1] == steps
    plain = local_pipeline.img2img(Img2ImgRequest(**{**request.as_dict(), "img2img_fix_steps": False}), picture)
    assert max_diff(plain.images, expected) > MAX_PIXEL_DIFF


def test_img2img_noise_multiplier_scales_the_starting_noise_as_a1111s(local_pipeline, diffusers_pipe):
    """A1111's "Noise multiplier for img2img": its sample() multiplies the starting noise before
    sample_img2img adds it at the first sigma."""
    from reference import sample_picture
    from sdtrt.requests.request import Img2ImgRequest

    picture, steps, strength = sample_picture(64, 64), 10, 0.6
    expected = k_reference(diffusers_pipe, "Euler a", steps, init=picture, strength=strength, noise_multiplier=0.8)
    request = Img2ImgRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=steps, width=64, height=64,
                             sampler="Euler a", k_diffusion=True, denoising_strength=strength,
                             initial_noise_multiplier=0.8)
    result = local_pipeline.img2img(request, picture)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert max_diff(result.images, k_reference(diffusers_pipe, "Euler a", steps, init=picture,
                                               strength=strength)) > MAX_PIXEL_DIFF
    assert "Noise multiplier: 0.8" in result.infotexts[0]


def test_settings_reach_the_infotext_as_a1111_writes_them(local_pipeline):
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="x", steps=3, width=64, height=64, sampler="Euler a",
                                                   eta=0.5, eta_noise_seed_delta=31337))
    assert "Eta: 0.5" in result.infotexts[0] and "ENSD: 31337" in result.infotexts[0]


def test_an_unset_eta_is_the_samplers_default(local_pipeline):
    """Euler a's eta 1 (A1111's eta_ancestral) is what diffusers' class does: no switch to k-diffusion."""
    settings = dict(prompt="x", steps=4, width=64, height=64, sampler="Euler a", seed=2)
    assert (local_pipeline.txt2img(Txt2ImgRequest(eta=1.0, **settings)).images
            == local_pipeline.txt2img(Txt2ImgRequest(**settings)).images).all()


def test_uncond_skipping_with_a_sampler_only_diffusers_runs_is_refused(local_pipeline):
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="LCM", s_min_uncond=2.0, width=64, height=64))
    assert exc.value.field == "s_min_uncond" and "'Euler a'" in str(exc.value) and "'DDIM'" in str(exc.value)


def test_a_k_diffusion_sampler_served_matches_the_local_runner(server, local_pipeline):
    settings = dict(sampler="DPM++ 2S a", steps=6, seed=4, width=64, height=64, eta=0.7, eta_noise_seed_delta=5)
    served = Client(server.url).txt2img("a lighthouse", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt="a lighthouse", **settings))
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    assert "Eta: 0.7" in served.infotexts[0] and "ENSD: 5" in served.infotexts[0]


def test_a1111s_schedule_options_served_match_the_local_runner(server, local_pipeline):
    settings = dict(sampler="Euler", schedule_type="Beta", steps=5, seed=4, width=64, height=64, beta_dist_alpha=0.4,
                    sigma_max=9.0, sd_noise_schedule="Zero Terminal SNR", always_discard_next_to_last_sigma=True)
    served = Client(server.url).txt2img("a lighthouse", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt="a lighthouse", **settings))
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF
    for key in ("Beta schedule alpha: 0.4", "Schedule max sigma: 9", "Noise Schedule: Zero Terminal SNR",
                "Discard penultimate sigma: True"):
        assert key in served.infotexts[0], served.infotexts[0]
