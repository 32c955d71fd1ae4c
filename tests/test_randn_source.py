"""A1111's noise sources: NV (the numbers an NVIDIA GPU's torch.randn gives for a seed, computed on the CPU by
sdtrt.philox) beside CPU (torch's CPU generator, the default and diffusers' own)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import MAX_PIXEL_DIFF, max_diff, reference_scheduler
from sdtrt.errors import InvalidRequest
from sdtrt.generation import settings_from_infotext
from sdtrt.philox import nv_randn
from sdtrt.request import Txt2ImgRequest

# torch.randn(3, 4, device="cuda") after torch.manual_seed(0), as A1111 records it in the docstring of its
# modules/rng_philox.py (the CPU implementation of its NV source is checked against these there).
CUDA_SEED_0 = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                        [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])


def test_nv_noise_matches_the_numbers_an_nvidia_gpu_gives():
    assert np.abs(nv_randn(0, (3, 4)) - CUDA_SEED_0).max() < 1e-6
    assert nv_randn(0, (3, 4)).dtype == np.float32


def test_nv_noise_is_a_standard_normal_that_moves_with_seed_and_offset():
    big = nv_randn(42, (4, 64, 64))
    assert abs(big.mean()) < 0.03 and abs(big.std() - 1) < 0.03
    assert np.array_equal(big, nv_randn(42, (4, 64, 64)))
    assert not np.allclose(big, nv_randn(43, (4, 64, 64)))
    assert not np.allclose(big, nv_randn(42, (4, 64, 64), offset=1))
    assert np.array_equal(nv_randn(42, (2, 3)).ravel(), nv_randn(42, (6,)))  # element order, not shape


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_nv_starts_from_an_nvidia_gpus_noise_for_the_seed(sampler, local_pipeline, diffusers_pipe):
    """diffusers given the NV numbers of seed+i as its latents draws what sdtrt draws with randn_source NV."""
    spec = local_pipeline.spec
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a lighthouse", sampler=sampler, steps=8, seed=77,
                                                   width=64, height=64, batch_size=2, randn_source="NV"))
    original = diffusers_pipe.scheduler
    expected = []
    try:
        for i in range(2):
            diffusers_pipe.scheduler = reference_scheduler(sampler, original.config, 77 + i)
            latents = torch.from_numpy(nv_randn(77 + i, (1, spec.latent_channels, 8, 8)))
            out = diffusers_pipe("a lighthouse", num_inference_steps=8, guidance_scale=7.0, width=64, height=64,
                                 latents=latents, output_type="np").images
            expected.append((out[0] * 255).round().astype(np.uint8))
    finally:
        diffusers_pipe.scheduler = original
    assert max_diff(result.images, np.stack(expected)) <= MAX_PIXEL_DIFF
    cpu = local_pipeline.txt2img(Txt2ImgRequest(prompt="a lighthouse", sampler=sampler, steps=8, seed=77, width=64,
                                                height=64, batch_size=2))
    assert max_diff(result.images, cpu.images) > 3 * MAX_PIXEL_DIFF  # another starting noise than CPU's
    assert all("RNG: NV" in text for text in result.infotexts) and "RNG: CPU" in cpu.infotexts[0]


def test_nv_with_a_sampler_that_adds_noise_every_step_is_refused_by_name(local_pipeline):
    with pytest.raises(InvalidRequest) as caught:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="Euler a", steps=2, width=64, height=64,
                                              randn_source="NV"))
    assert caught.value.field == "randn_source" and "DPM++ 2M" in str(caught.value)


def test_the_infotext_says_which_source_and_a1111s_gpu_reads_as_nv():
    assert settings_from_infotext("a\nSteps: 4, Seed: 1, RNG: NV")["randn_source"] == "NV"
    assert settings_from_infotext("a\nSteps: 4, Seed: 1, RNG: GPU")["randn_source"] == "NV"
    assert settings_from_infotext("a\nSteps: 4, Seed: 1, RNG: CPU")["randn_source"] == "CPU"
    assert "randn_source" not in settings_from_infotext("a\nSteps: 4, Seed: 1")  # sdtrt's default: CPU


def test_served_nv_matches_in_process(server, local_pipeline):
    from sdtrt.client import Client

    settings = dict(prompt="a harbour", sampler="DPM++ 2M", steps=5, seed=11, width=64, height=64,
                    randn_source="NV", subseed=5, subseed_strength=0.3)
    served = Client(server.url).txt2img(**settings)
    assert (served.images == local_pipeline.txt2img(Txt2ImgRequest(**settings)).images).all()
