"""The in-process onnxruntime runner against diffusers' own StableDiffusionPipeline: same folder, seed, settings."""

from __future__ import annotations

import pytest

import numpy as np
import torch

from reference import (
    A1111_AUTOMATIC, MAX_PIXEL_DIFF, REFERENCE_SCHEDULERS, diffusers_images, max_diff, reference_scheduler,
)
from sdtrt.contract.samplers import SAMPLERS
from sdtrt.requests.request import Txt2ImgRequest

CASES = [
    # (sampler, width, height, batch): square and non-square sizes, several images per request
    ("Euler a", 64, 64, 2),
    ("Euler a", 96, 64, 1),
    ("DPM++ 2M Karras", 64, 64, 1),
    ("DPM++ 2M Karras", 64, 112, 2),
    ("DDIM", 64, 64, 1),
    ("DDIM", 80, 64, 1),
    ("Euler", 64, 64, 1),
    ("DPM++ 2M", 64, 64, 1),
    ("PLMS", 64, 64, 1),
]


@pytest.mark.parametrize("sampler,width,height,batch", CASES)
def test_matches_diffusers(sampler, width, height, batch, local_pipeline, diffusers_pipe):
    settings = dict(prompt="a lighthouse on a cliff, oil painting", negative_prompt="blurry, low quality",
                    sampler=sampler, steps=12, cfg=7.5, seed=1234, width=width, height=height)
    expected = diffusers_images(diffusers_pipe, batch_size=batch, **settings)
    result = local_pipeline.txt2img(Txt2ImgRequest(
        prompt=settings["prompt"], negative_prompt=settings["negative_prompt"], sampler=sampler, steps=12,
        guidance_scale=7.5, seed=1234, width=width, height=height, batch_size=batch))
    assert result.images.shape == (batch, height, width, 3)
    assert result.seeds == [1234 + i for i in range(batch)]
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    assert result.images.std() > 1.0  # a real picture, not a blank


DIFFUSERS_SAMPLERS = [name for name, s in SAMPLERS.items() if s.scheduler]  # the rest: tests/test_k_diffusion.py


def test_reference_table_covers_every_sampler_diffusers_has():
    assert set(REFERENCE_SCHEDULERS) == set(DIFFUSERS_SAMPLERS)


@pytest.mark.parametrize("sampler", DIFFUSERS_SAMPLERS)
def test_every_sampler_matches_diffusers(sampler, local_pipeline, diffusers_pipe):
    expected = diffusers_images(diffusers_pipe, prompt="a castle in the clouds", negative_prompt="ugly", sampler=sampler,
                                steps=8, cfg=7.0, seed=99, width=64, height=64, batch_size=2)
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a castle in the clouds", negative_prompt="ugly",
                                                   sampler=sampler, steps=8, guidance_scale=7.0, seed=99, width=64,
                                                   height=64, batch_size=2))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("sampler,schedule", [("Euler", "Karras"), ("DPM++ 2M", "Exponential"), ("Euler a", "SGM Uniform"),
                                              ("UniPC", "SGM Uniform"), ("DPM++ SDE", "Karras"), ("LMS", "Exponential"),
                                              ("Euler", "Beta"), ("DPM++ 2M", "Uniform"), ("LMS", "Polyexponential"),
                                              ("Heun", "Karras"), ("DPM++ 2M SDE Heun", "Beta")])
def test_schedule_types_match_diffusers(sampler, schedule, local_pipeline, diffusers_pipe):
    expected = diffusers_images(diffusers_pipe, prompt="a castle", sampler=sampler, schedule_type=schedule, steps=8,
                                cfg=7.0, seed=5, width=64, height=64)
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a castle", sampler=sampler, schedule_type=schedule, steps=8,
                                                   guidance_scale=7.0, seed=5, width=64, height=64))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    # against another schedule (Automatic, unless A1111's Automatic for this sampler is this very schedule)
    other = "SGM Uniform" if A1111_AUTOMATIC.get(sampler) == schedule else "Automatic"
    plain = local_pipeline.txt2img(Txt2ImgRequest(prompt="a castle", sampler=sampler, schedule_type=other, steps=8,
                                                  guidance_scale=7.0, seed=5, width=64, height=64))
    assert (plain.images != result.images).any()  # the schedule really changed the sampling
    assert f"Schedule type: {schedule}" in result.infotexts[0]


def test_unsupported_schedule_is_refused_with_the_allowed_ones(local_pipeline):
    from sdtrt.contract.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as exc:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="PLMS", schedule_type="Karras", width=64, height=64))
    assert exc.value.field == "schedule_type"
    assert "'Automatic', 'Uniform', 'SGM Uniform' with sampler 'PLMS'" in str(exc.value)


def test_guidance_off_matches_diffusers(local_pipeline, diffusers_pipe):
    expected = diffusers_images(diffusers_pipe, prompt="a cat", sampler="Euler", steps=8, cfg=1.0, seed=7,
                                width=64, height=64)
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a cat", sampler="Euler", steps=8, guidance_scale=1.0,
                                                   seed=7, width=64, height=64))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF


def test_guidance_rescale_matches_diffusers(local_pipeline, diffusers_pipe):
    # a high CFG scale, where the rescale shows (on the tiny default model it moves pixels by ~20 of 255)
    expected = diffusers_images(diffusers_pipe, prompt="a cat", sampler="DDIM", steps=8, cfg=20.0, seed=7,
                                width=64, height=64, guidance_rescale=0.9)
    request = Txt2ImgRequest(prompt="a cat", sampler="DDIM", steps=8, guidance_scale=20.0, seed=7, width=64,
                             height=64, guidance_rescale=0.9)
    result = local_pipeline.txt2img(request)
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF
    plain = local_pipeline.txt2img(Txt2ImgRequest(**{**request.__dict__, "guidance_rescale": 0.0}))
    assert max_diff(plain.images, expected) > 5 * MAX_PIXEL_DIFF  # the rescale is what makes them match
    assert "Guidance rescale: 0.9" in result.infotexts[0]


def test_seed_changes_the_picture_and_is_reproducible(local_pipeline):
    request = dict(prompt="a cat", steps=6, width=64, height=64)
    a = local_pipeline.txt2img(Txt2ImgRequest(seed=1, **request)).images
    b = local_pipeline.txt2img(Txt2ImgRequest(seed=1, **request)).images
    c = local_pipeline.txt2img(Txt2ImgRequest(seed=2, **request)).images
    assert (a == b).all()
    assert max_diff(a, c) > 10


def test_random_seed_is_reported_and_reproduces(local_pipeline):
    first = local_pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=4, width=64, height=64, seed=-1))
    assert 0 <= first.seeds[0] < 2**32
    again = local_pipeline.txt2img(Txt2ImgRequest(prompt="a cat", steps=4, width=64, height=64, seed=first.seeds[0]))
    assert (first.images == again.images).all()
    assert f"Seed: {first.seeds[0]}," in first.infotexts[0]


def a1111_slerp(val, low, high):
    """A1111's slerp (modules/processing.py), restated for the check."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_variation_seed_matches_diffusers_given_the_same_noise(sampler, local_pipeline, diffusers_pipe):
    seed, subseed, strength = 10, 500, 0.3
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a cat", sampler=sampler, steps=8, seed=seed, width=64,
                                                   height=64, batch_size=2, subseed=subseed, subseed_strength=strength))
    original = diffusers_pipe.scheduler
    assert result.seeds == [seed, seed]  # A1111: with a variation seed every image keeps the seed
    try:
        for i in range(2):
            diffusers_pipe.scheduler = reference_scheduler(sampler, original.config, seed)
            generator = torch.Generator("cpu").manual_seed(seed)
            base = torch.randn((4, 8, 8), generator=generator)  # also advances the generator, as the contract says
            variation = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(subseed + i))
            latents = a1111_slerp(strength, base, variation)[None]
            expected = diffusers_pipe("a cat", num_inference_steps=8, guidance_scale=7.0, width=64, height=64,
                                      latents=latents, generator=generator, output_type="np").images
            assert max_diff(result.images[i:i + 1], (expected * 255).round().astype(np.uint8)) <= MAX_PIXEL_DIFF
    finally:
        diffusers_pipe.scheduler = original
    assert f"Seed: {seed}, Size: 64x64" in result.infotexts[1]
    assert f"Variation seed: {subseed + 1}, Variation seed strength: 0.3" in result.infotexts[1]


def test_variation_strength_one_is_the_variation_seeds_picture(local_pipeline):
    settings = dict(prompt="a cat", sampler="Euler", steps=6, width=64, height=64)  # Euler: no step noise
    varied = local_pipeline.txt2img(Txt2ImgRequest(seed=1, subseed=77, subseed_strength=1.0, **settings))
    plain = local_pipeline.txt2img(Txt2ImgRequest(seed=77, **settings))
    none = local_pipeline.txt2img(Txt2ImgRequest(seed=1, subseed=77, subseed_strength=0.0, **settings))
    assert max_diff(varied.images, plain.images) <= MAX_PIXEL_DIFF
    assert (none.images == local_pipeline.txt2img(Txt2ImgRequest(seed=1, **settings)).images).all()


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM2", "Euler"])
def test_automatic_is_a1111s_schedule_for_the_sampler(sampler, local_pipeline):
    """A1111 1.9+ runs DPM++ 2M, DPM++ SDE and DPM2 on Karras and DPM++ 2M SDE on Exponential when left on
    Automatic; the others on the checkpoint's own schedule."""
    settings = dict(prompt="a castle", sampler=sampler, steps=6, guidance_scale=7.0, seed=5, width=64, height=64)
    automatic = local_pipeline.txt2img(Txt2ImgRequest(**settings))
    named = A1111_AUTOMATIC.get(sampler)
    if named is None:
        karras = local_pipeline.txt2img(Txt2ImgRequest(schedule_type="Karras", **settings))
        assert (automatic.images != karras.images).any()
        assert "Schedule type" not in automatic.infotexts[0]
    else:
        assert (automatic.images == local_pipeline.txt2img(Txt2ImgRequest(schedule_type=named, **settings)).images).all()
        assert f"Schedule type: {named}" in automatic.infotexts[0]  # as A1111 1.9+ writes it
