"""A1111's own timestep samplers (DDIM, DDIM CFG++, PLMS) against A1111's code path on a network whose cond and
uncond predictions differ strongly, so that every term of the update shows (the default model's guidance is weak:
its pictures are in tests/test_a1111_exact.py). The reference is tests/test_a1111_exact.py's restatement of
A1111 1.10's sd_samplers_timesteps_impl and CFGDenoiserTimesteps; sdtrt's loop (sdtrt.pipeline.denoise) drives the
same network with its TSchedule."""

from __future__ import annotations

import types

import pytest
import torch

from reference import A1111Schedules
from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.samplers import SAMPLERS, SamplerSettings, runs_on_a1111_timesteps
from sdtrt.pipeline.conditioning import CONTEXT_INPUT
from sdtrt.pipeline.denoise import Guidance, Pass, denoise, prepare_latents
from sdtrt.pipeline.timesteps import TSchedule, a1111_timesteps
from sdtrt.requests.generation import settings_from_infotext
from sdtrt.requests.request import Txt2ImgRequest
from test_a1111_exact import ImageRng, a1111_timestep_sample, compvis_timesteps

CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


ALPHAS = A1111Schedules(CONFIG).alphas_cumprod


def network(sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A noise prediction that depends on the sample, the timestep and (strongly) the text context, and keeps the
    samples bounded as a trained one does (mostly the noise a sample at that level holds)."""
    text = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    noise = torch.sqrt(1 - ALPHAS[timestep.long()]).reshape(-1, 1, 1, 1)
    return 0.9 * noise * sample + 0.2 * torch.sin(2.0 * sample) + text


def sdtrt_unet(sample, timestep, context):
    return network(sample, timestep, context[CONTEXT_INPUT])


class A1111Pipe:
    """What the reference calls: ``pipe.unet(x, t, encoder_hidden_states=...).sample``."""

    @staticmethod
    def unet(x, t, encoder_hidden_states):
        return types.SimpleNamespace(sample=network(x, t.float(), encoder_hidden_states))


COND, UNCOND = torch.full((1, 4, 8), 0.4), torch.full((1, 4, 8), -0.3)


@pytest.mark.parametrize("sampler,eta,steps", [("DDIM", 0.0, 10), ("DDIM", 0.7, 7), ("DDIM CFG++", 0.0, 8),
                                               ("DDIM CFG++", 0.5, 6), ("PLMS", 0.0, 9), ("PLMS", 0.0, 3)])
def test_a1111_timestep_samplers_as_a1111_runs_them(sampler, eta, steps):
    cfg, seed = 6.0, 11
    rng = ImageRng(seed, False, 0)
    x = rng.next((4, 6, 6))[None]
    expected = a1111_timestep_sample(A1111Pipe, A1111Schedules(CONFIG), sampler, x.clone(), compvis_timesteps(steps),
                                     COND, UNCOND, cfg, rng, eta=eta)

    schedule = TSchedule(SAMPLERS[sampler], CONFIG, SamplerSettings(eta=eta), [seed])
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn((4, 6, 6), generator=generator)[None]  # the starting noise, then the step noise goes on
    run = Pass(schedule, [generator])
    latents = prepare_latents(schedule, start, steps)
    guidance = Guidance(cfg, always_uncond=schedule.cfgpp)
    result = denoise(run, sdtrt_unet, latents, {CONTEXT_INPUT: torch.cat([UNCOND, COND])}, guidance)
    assert torch.allclose(result, expected, atol=1e-4), float((result - expected).abs().max())
    assert (result - x).abs().max() > 0.1  # it did sample


def test_cfgpp_steps_along_the_unconditional_prediction():
    """DDIM CFG++ is not DDIM at CFG / 12.5 (which the test above could otherwise not tell apart)."""
    def run(sampler: str, cfg: float) -> torch.Tensor:
        schedule = TSchedule(SAMPLERS[sampler], CONFIG, SamplerSettings(), [1])
        latents = prepare_latents(schedule, torch.ones(1, 4, 6, 6), 8)
        return denoise(Pass(schedule, [torch.Generator()]), sdtrt_unet, latents,
                       {CONTEXT_INPUT: torch.cat([UNCOND, COND])}, Guidance(cfg, always_uncond=True))

    assert (run("DDIM CFG++", 10.0) - run("DDIM", 10.0 / 12.5)).abs().max() > 0.05


def test_a1111s_timesteps_and_img2img_steps():
    """CompVisSampler.get_timesteps and setup_img2img_steps, from A1111's numbers: 20 steps are 1, 51, ..., 951
    (19 model calls); img2img at strength 0.5 runs the first 10 and adds its noise at the 11th; a hires pass of 6
    steps at 0.55 stretches the schedule to int(6 / 0.55) = 10 steps and keeps 5."""
    assert a1111_timesteps(20).tolist() == list(range(1, 1000, 50)) and a1111_timesteps(3).tolist() == [1, 334, 667, 999]
    schedule = TSchedule(SAMPLERS["DDIM"], CONFIG, SamplerSettings(), [1])
    assert len(schedule.strength_timesteps(20, 0.5)) == 9 and schedule.noise_level == 501
    assert schedule.run_timesteps.tolist() == list(range(1, 500, 50))
    assert len(schedule.strength_timesteps(6, 0.55, second_pass=True)) == 4 and schedule.noise_level == 501


def test_which_path_runs_a_timestep_sampler():
    assert runs_on_a1111_timesteps("DDIM CFG++", "Automatic")  # no library has it
    assert not runs_on_a1111_timesteps("DDIM", "Automatic")  # diffusers' DDIMScheduler by default
    assert runs_on_a1111_timesteps("DDIM", "Automatic", SamplerSettings(k_diffusion=True))  # A1111-exact
    assert runs_on_a1111_timesteps("PLMS", "Automatic", SamplerSettings(s_min_uncond=5.0))  # A1111's NGMS
    assert runs_on_a1111_timesteps("DDIM", "Automatic", SamplerSettings(eta=0.5, randn_source="NV"))
    assert not runs_on_a1111_timesteps("DDIM", "SGM Uniform", SamplerSettings(k_diffusion=True))
    assert runs_on_a1111_timesteps("UniPC", "Automatic", SamplerSettings(k_diffusion=True))  # A1111-exact
    assert not runs_on_a1111_timesteps("UniPC", "Automatic")  # diffusers' UniPCMultistepScheduler by default


def test_ddim_cfgpp_runs_and_its_infotext_reads_back(local_pipeline):
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a red fox", sampler="DDIM CFG++", steps=6, eta=0.4,
                                                   width=64, height=64, seed=5))
    assert result.images.std() > 1.0
    assert "Sampler: DDIM CFG++" in result.infotexts[0] and "Eta DDIM: 0.4" in result.infotexts[0]
    read = settings_from_infotext(result.infotexts[0])
    assert read["sampler"] == "DDIM CFG++" and float(read["eta"]) == 0.4


def test_a_timestep_hires_sampler_ignores_the_first_passs_schedule_and_bounds_its_strength(local_pipeline):
    """A1111 ignores the schedule type for its timestep samplers: DDIM CFG++ after DPM++ 2M Karras runs; a
    strength so small that steps / strength exceeds A1111's 1000 timesteps is refused by name (A1111 fails)."""
    settings = dict(prompt="x", sampler="DPM++ 2M", schedule_type="Karras", steps=3, width=64, height=64,
                    enable_hr=True, hr_scale=1.5, hr_sampler="DDIM CFG++", hr_second_pass_steps=3)
    assert local_pipeline.txt2img(Txt2ImgRequest(**settings, denoising_strength=0.5)).images.shape == (1, 96, 96, 3)
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(**settings, denoising_strength=0.002))
    assert exc.value.field == "denoising_strength" and "at least 0.003" in str(exc.value)


def test_ddim_cfgpp_takes_only_a1111s_timesteps(local_pipeline):
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="DDIM CFG++", schedule_type="Karras", width=64,
                                              height=64))
    assert exc.value.field == "schedule_type" and "'Automatic'" in str(exc.value)


def test_unipc_on_a1111s_path_needs_its_order_of_steps(local_pipeline):
    """A1111's UniPC (order 3) stops with an assertion below 3 steps: a 422 naming the field instead; diffusers'
    UniPC (k_diffusion off) lowers its order and draws."""
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="UniPC", steps=2, width=64, height=64,
                                              k_diffusion=True))
    assert exc.value.field == "steps" and "at least 3" in str(exc.value)
    assert local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="UniPC", steps=2, width=64,
                                                 height=64)).images.shape[0] == 1
    done = []
    local_pipeline.generate(local_pipeline.plan(Txt2ImgRequest(prompt="x", sampler="UniPC", steps=5, width=64,
                                                               height=64, k_diffusion=True)),
                            on_step=lambda step, total, _: done.append((step, total)))
    assert done == [(i, 5) for i in range(1, 6)]  # every step evaluates the U-Net once


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS"])
def test_zero_terminal_snr_and_the_extra_step_on_a1111s_timesteps(sampler):
    """A1111's timestep samplers read its model's noise levels, which its Zero Terminal SNR option rescales, and take
    always_discard_next_to_last_sigma as one step more (they have no sigma to discard)."""
    cfg, seed, steps = 6.0, 11, 9
    rng = ImageRng(seed, False, 0)
    x = rng.next((4, 6, 6))[None]
    schedules = A1111Schedules(CONFIG, zero_snr=True)
    expected = a1111_timestep_sample(A1111Pipe, schedules, sampler, x.clone(), compvis_timesteps(steps + 1), COND,
                                     UNCOND, cfg, rng)
    settings = SamplerSettings(sd_noise_schedule="Zero Terminal SNR", always_discard_next_to_last_sigma=True)
    assert runs_on_a1111_timesteps(sampler, "Automatic", settings)
    schedule = TSchedule(SAMPLERS[sampler], CONFIG, settings, [seed])
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn((4, 6, 6), generator=generator)[None]
    latents = prepare_latents(schedule, start, steps)
    result = denoise(Pass(schedule, [generator]), sdtrt_unet, latents, {CONTEXT_INPUT: torch.cat([UNCOND, COND])},
                     Guidance(cfg))
    assert torch.allclose(result, expected, atol=1e-4), float((result - expected).abs().max())
    plain = TSchedule(SAMPLERS[sampler], CONFIG, SamplerSettings(), [seed])
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn((4, 6, 6), generator=generator)[None]
    other = denoise(Pass(plain, [generator]), sdtrt_unet, prepare_latents(plain, start, steps),
                    {CONTEXT_INPUT: torch.cat([UNCOND, COND])}, Guidance(cfg))
    assert (other - expected).abs().max() > 0.01


def test_a1111s_schedule_options_are_refused_where_diffusers_runs_the_sampler(local_pipeline):
    """LCM (and DDIM on a schedule type of diffusers') have no A1111 code path to take them."""
    for sampler, schedule, field, value in (("LCM", "Automatic", "sd_noise_schedule", "Zero Terminal SNR"),
                                            ("DDIM", "Uniform", "sigma_max", 5.0),
                                            ("UniPC", "Beta", "beta_dist_alpha", 0.3)):
        with pytest.raises(InvalidRequest) as exc:
            local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler=sampler, schedule_type=schedule, width=64,
                                                  height=64, **{field: value}))
        assert exc.value.field == field and repr(sampler) in str(exc.value)
    # A1111's timestep samplers ignore the sigma options, as A1111's do
    plain = dict(prompt="x", sampler="DDIM", steps=3, width=64, height=64, seed=1)
    assert (local_pipeline.txt2img(Txt2ImgRequest(sigma_max=5.0, **plain)).images
            == local_pipeline.txt2img(Txt2ImgRequest(**plain)).images).all()
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sigma_min=5.0, sigma_max=2.0, width=64, height=64))
    assert exc.value.field == "sigma_min" and "below sigma_max" in str(exc.value)


@pytest.mark.parametrize("variant, skip_type, order, lower_order_final", [
    ("bh2", "time_uniform", 3, True), ("bh1", "logSNR", 2, True), ("bh1", "time_quadratic", 3, False),
    ("bh2", "logSNR", 4, False),
])
def test_a1111s_unipc_options(variant, skip_type, order, lower_order_final):
    """A1111's uni_pc options (variant, skip type, order, lower order final) against the UniPC authors' code path
    as A1111 runs it (tests/test_a1111_exact.py's a1111_unipc)."""
    cfg, seed, steps = 6.0, 11, 8
    rng = ImageRng(seed, False, 0)
    x = rng.next((4, 6, 6))[None]
    options = dict(variant=variant, skip_type=skip_type, order=order, lower_order_final=lower_order_final)
    expected = a1111_timestep_sample(A1111Pipe, A1111Schedules(CONFIG), "UniPC", x.clone(), compvis_timesteps(steps),
                                     COND, UNCOND, cfg, rng, unipc=options)
    settings = SamplerSettings(**{f"unipc_{k}": v for k, v in options.items()})
    assert runs_on_a1111_timesteps("UniPC", "Automatic", settings)
    schedule = TSchedule(SAMPLERS["UniPC"], CONFIG, settings, [seed])
    start = torch.randn((4, 6, 6), generator=torch.Generator().manual_seed(seed))[None]
    result = denoise(Pass(schedule, [torch.Generator()]), sdtrt_unet, prepare_latents(schedule, start, steps),
                     {CONTEXT_INPUT: torch.cat([UNCOND, COND])}, Guidance(cfg))
    assert torch.allclose(result, expected, atol=1e-4), float((result - expected).abs().max())
    default = a1111_timestep_sample(A1111Pipe, A1111Schedules(CONFIG), "UniPC", x.clone(), compvis_timesteps(steps),
                                    COND, UNCOND, cfg, ImageRng(seed, False, 0))
    assert (default - expected).abs().max() > 1e-3  # the options change the picture


def test_unipc_options_are_refused_where_a1111s_unipc_does_not_run(local_pipeline):
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="UniPC", schedule_type="Karras", unipc_order=2,
                                              width=64, height=64))
    assert exc.value.field == "unipc_order" and "Automatic" in str(exc.value)
    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="UniPC", steps=3, unipc_order=5, width=64,
                                              height=64))  # (3 steps are 4 of A1111's timesteps: 1000 // 3 apart)
    assert exc.value.field == "steps" and "at least 5 steps" in str(exc.value)
