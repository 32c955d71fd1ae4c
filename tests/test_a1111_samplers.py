"""A1111's samplers and schedule types past the common ones: each against its reference, or refused by name.

The schedules' references are A1111's own definitions (k-diffusion's get_sigmas_* and A1111's
modules/sd_schedulers.py), restated in tests/reference.py; the pictures' reference is diffusers' pipeline with
the same scheduler, given A1111's sigmas where diffusers has no setting for the schedule.
"""

from __future__ import annotations

import pytest
import torch

import diffusers as d

from reference import (
    A1111_SIGMA_SCHEDULES, MAX_PIXEL_DIFF, A1111Schedules, diffusers_images, max_diff,
)
from sdtrt.client import Client
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.request import Txt2ImgRequest
from sdtrt.contract.samplers import SAMPLERS, SCHEDULE_TYPES, make_scheduler, schedule_table, set_timesteps

NAMED = [t for t in SCHEDULE_TYPES if t != "Automatic"]


def test_every_a1111_schedule_type_is_offered():
    assert set(SCHEDULE_TYPES) == {"Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                                   "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"}


@pytest.mark.parametrize("steps", [8, 20, 30])
@pytest.mark.parametrize("schedule", NAMED)
def test_euler_samples_at_a1111s_sigmas(schedule, steps, diffusers_pipe):
    """The noise levels themselves, for every schedule type: float32 rounding apart (1e-4 relative), except SGM
    Uniform, diffusers' "trailing" spacing, whose integer timesteps sit at most one training timestep from
    A1111's fractional ones (2.5% in sigma)."""
    config = dict(diffusers_pipe.scheduler.config)
    scheduler = make_scheduler("Euler", config, schedule, schedule_table(config))
    set_timesteps(scheduler, steps)
    ours = scheduler.sigmas.double()
    expected = A1111Schedules(config).sigmas(schedule, steps).double()
    assert ours.shape == expected.shape
    tolerance = 0.025 if schedule == "SGM Uniform" else 1e-4
    torch.testing.assert_close(ours, expected, rtol=tolerance, atol=1e-6)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-4, atol=0)  # every schedule starts where A1111's does


def test_a1111s_ddim_schedule_keeps_its_extra_step(diffusers_pipe):
    """1000 // 30 = 33 does not divide the training steps: A1111's DDIM schedule then runs 31 steps."""
    config = dict(diffusers_pipe.scheduler.config)
    scheduler = make_scheduler("Euler", config, "DDIM", schedule_table(config))
    set_timesteps(scheduler, 30)
    assert len(scheduler.timesteps) == 31


@pytest.mark.parametrize("sampler", [s for s, types in schedule_table().items() if "Karras" in types
                                     and not s.endswith("Karras") and SAMPLERS[s].scheduler])
def test_karras_spans_the_models_whole_sigma_range(sampler, diffusers_pipe):
    """k-diffusion's Karras runs from the model's largest sigma; diffusers' Euler-family classes, left on SD's
    "leading" spacing, would start at the largest *spaced* sigma (11.0 instead of 14.6)."""
    config = dict(diffusers_pipe.scheduler.config)
    table = schedule_table(config)
    scheduler = make_scheduler(sampler, config, "Karras", table, [0])
    set_timesteps(scheduler, 10)
    largest = A1111Schedules(config).sigma_max
    assert float(scheduler.sigmas.max()) == pytest.approx(largest, rel=1e-4)


@pytest.mark.parametrize("schedule", A1111_SIGMA_SCHEDULES)
def test_a1111s_own_schedules_match_diffusers_given_their_sigmas(schedule, local_pipeline, diffusers_pipe):
    settings = dict(prompt="a castle", sampler="Euler", steps=8, seed=5, width=64, height=64)
    expected = diffusers_images(diffusers_pipe, cfg=7.0, schedule_type=schedule, **settings)
    result = local_pipeline.txt2img(Txt2ImgRequest(guidance_scale=7.0, schedule_type=schedule, **settings))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    # A1111's DDIM schedule is the checkpoint's own "leading" spacing, so against evenly spaced steps
    plain = local_pipeline.txt2img(Txt2ImgRequest(guidance_scale=7.0, schedule_type="Uniform", **settings))
    assert (plain.images != result.images).any()
    assert f"Schedule type: {schedule}" in result.infotexts[0]


def test_a1111_schedule_served_matches_the_local_runner(server, local_pipeline):
    settings = dict(sampler="Euler", schedule_type="Align Your Steps", steps=6, guidance_scale=7.0, seed=8, width=64,
                    height=64)
    served = Client(server.url).txt2img("a lighthouse", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt="a lighthouse", **settings))
    assert max_diff(served.images, local.images) <= MAX_PIXEL_DIFF


def test_a1111_schedule_with_a_sampler_that_cannot_take_it_names_the_ones_it_can(local_pipeline):
    """A sampler k-diffusion lacks runs only the schedules its diffusers class follows."""
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="PLMS", schedule_type="Align Your Steps",
                                              width=64, height=64))
    assert exc.value.field == "schedule_type" and "with sampler 'PLMS'" in str(exc.value)


def test_a_schedule_the_diffusers_class_cannot_follow_runs_on_k_diffusion(local_pipeline):
    """Euler a's diffusers class takes no custom sigmas: with A1111's own schedule it runs as A1111 runs it."""
    settings = dict(prompt="x", sampler="Euler a", schedule_type="Align Your Steps", steps=5, width=64, height=64,
                    seed=3)
    assert (local_pipeline.txt2img(Txt2ImgRequest(**settings)).images
            == local_pipeline.txt2img(Txt2ImgRequest(k_diffusion=True, **settings)).images).all()


def test_every_a1111_1_10_sampler_is_served_and_an_unknown_one_is_refused_by_name(server):
    """A1111 1.10's sampler list (sd_samplers_kdiffusion, sd_samplers_timesteps, sd_samplers_lcm): none refused."""
    a1111 = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a",
             "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++",
             "PLMS", "UniPC", "LCM"]
    assert set(a1111) <= set(SAMPLERS)
    client = Client(server.url)
    with pytest.raises(Exception, match=r"sampler must be one of: .*'DDIM CFG\+\+'"):
        client.txt2img("x", sampler="DDIM CFG+", steps=2, width=64, height=64)
    assert client.txt2img("x", sampler="DDIM CFG++", steps=2, width=64, height=64).images.shape[0] == 1


def test_lcm_steps_are_capped_at_its_original_schedule(local_pipeline):
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="LCM", steps=60, width=64, height=64))
    assert exc.value.field == "steps" and "at most 50 with sampler 'LCM'" in str(exc.value)


def test_diffusers_third_order_sde_step_still_differs_from_k_diffusions():
    """Why DPM++ 3M SDE runs on k-diffusion only: diffusers' third-order SDE-DPM-Solver++ update adds -1/2 * D2 where
    k-diffusion's sample_dpmpp_3m_sde (eta 1) adds +1/2 * D2 (D2: the second divided difference of the denoised
    estimates). Data predictions on a parabola in log-SNR make D2 non-zero; with the step's noise set to zero the
    two updates differ by exactly alpha_t * D2. When diffusers changes this, this test fails: then diffusers'
    class can run the sampler too."""
    scheduler = d.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3,
                                              beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                              lower_order_final=False, final_sigmas_type="zero")
    scheduler.set_timesteps(10)
    x = torch.ones(1, 1, 1, 1)
    denoised = []
    for i in range(3):  # the third call takes the third-order branch
        t = scheduler.timesteps[i]
        sigma = scheduler.sigmas[i]
        lam = -torch.log(sigma)
        x0 = 0.1 * lam ** 2 * torch.ones_like(x)  # a parabola in log-SNR: D2 != 0
        denoised.append((x0, sigma))
        alpha_s = 1 / (sigma ** 2 + 1) ** 0.5
        eps = (x * alpha_s - alpha_s * x0) / (sigma * alpha_s)  # the epsilon that gives this x0 at x
        before = x.clone()
        x = scheduler.step(eps, t, x * alpha_s, variance_noise=torch.zeros_like(x)).prev_sample
        sigma_next = scheduler.sigmas[i + 1]
        x = x * (sigma_next ** 2 + 1) ** 0.5  # back to k-diffusion's (unscaled) space
    # k-diffusion's third-order step from `before` (sigma_2 -> sigma_3), eta = 1, no noise
    (d0, s0), (d1, s1), (d2, s2) = denoised[2], denoised[1], denoised[0]
    s3 = scheduler.sigmas[3]
    h, h1, h2 = (-torch.log(s3) + torch.log(s0)), (-torch.log(s0) + torch.log(s1)), (-torch.log(s1) + torch.log(s2))
    h_eta = 2 * h
    k = torch.exp(-h_eta) * before + (-h_eta).expm1().neg() * d0
    r0, r1 = h1 / h, h2 / h
    d1_0, d1_1 = (d0 - d1) / r0, (d1 - d2) / r1
    dd1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    dd2 = (d1_0 - d1_1) / (r0 + r1)
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    phi_3 = phi_2 / h_eta - 0.5
    k = k + phi_2 * dd1 - phi_3 * dd2
    assert abs(float(dd2)) > 1e-3
    torch.testing.assert_close(k - x, dd2, rtol=1e-3, atol=1e-5)
