"""A1111's seeds: its noise sources, NV (the numbers an NVIDIA GPU's torch.randn gives for a seed, computed on the
CPU by sdtrt.contract.philox) beside CPU (torch's CPU generator, the default and diffusers' own); its variation-seed rule
for batches; its "Resize seed from"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import MAX_PIXEL_DIFF, max_diff, reference_scheduler
from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.generation import settings_from_infotext
from sdtrt.contract.philox import nv_randn
from sdtrt.requests.request import Txt2ImgRequest

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


def test_nv_with_a_sampler_only_diffusers_runs_that_adds_noise_every_step_is_refused_by_name(local_pipeline):
    """LCM's step noise comes from torch's generators in diffusers' scheduler: NV would be half A1111's."""
    with pytest.raises(InvalidRequest) as caught:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="LCM", steps=2, width=64, height=64,
                                              randn_source="NV"))
    assert caught.value.field == "randn_source" and "NV works with: Euler a," in str(caught.value)


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


def test_with_a_variation_seed_every_image_and_batch_keeps_the_seed(local_pipeline):
    """A1111's all_seeds / all_subseeds: seed for every image and batch, variation seed + i across all of them."""
    from sdtrt.requests.generation import batch_count

    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="x", sampler="Euler", steps=2, width=64, height=64,
                                                   batch_size=2, seed=40, subseed=7, subseed_strength=0.2))
    assert result.seeds == [40, 40]
    assert ["Variation seed: 7," in result.infotexts[0], "Variation seed: 8," in result.infotexts[1]] == [True, True]
    batches = list(batch_count(Txt2ImgRequest(seed=40, subseed=7, subseed_strength=0.2, batch_size=2), 3))
    assert [(b.seed, b.subseed) for b in batches] == [(40, 7), (40, 9), (40, 11)]
    plain = list(batch_count(Txt2ImgRequest(seed=40, subseed=7, subseed_strength=0.0, batch_size=2), 2))
    assert [b.seed for b in plain] == [40, 42]


def a1111_resized_noise(seed: int, full: tuple[int, int, int], small: tuple[int, int, int]):
    """A1111's "Resize seed from", written out: the seed's noise at the small size from a fresh generator, pasted
    centred (cropped where larger; an odd difference leaves the extra row or column) into the full-size draw of
    the image's generator, which the sampler then goes on using."""
    generator = torch.Generator("cpu").manual_seed(seed)
    canvas = torch.randn(full, generator=generator)
    noise = torch.randn(small, generator=torch.Generator("cpu").manual_seed(seed))
    (_, height, width), (_, h, w) = full, small
    dy, dx = (height - h) // 2, (width - w) // 2
    rows, cols = (h if dy >= 0 else h + 2 * dy), (w if dx >= 0 else w + 2 * dx)
    canvas[:, max(dy, 0):max(dy, 0) + rows, max(dx, 0):max(dx, 0) + cols] = \
        noise[:, max(-dy, 0):max(-dy, 0) + rows, max(-dx, 0):max(-dx, 0) + cols]
    return canvas[None], generator


@pytest.mark.parametrize("from_w,from_h", [(40, 48), (96, 88)])  # smaller and larger than the 64x64 picture
def test_resize_seed_from_draws_the_seeds_noise_at_that_size(from_w, from_h, local_pipeline, diffusers_pipe):
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a lighthouse", sampler="Euler a", steps=6, seed=21,
                                                   width=64, height=64, seed_resize_from_w=from_w,
                                                   seed_resize_from_h=from_h))
    latents, generator = a1111_resized_noise(21, (4, 8, 8), (4, from_h // 8, from_w // 8))
    original = diffusers_pipe.scheduler
    try:
        diffusers_pipe.scheduler = reference_scheduler("Euler a", original.config, 21)
        expected = diffusers_pipe("a lighthouse", num_inference_steps=6, guidance_scale=7.0, width=64, height=64,
                                  latents=latents, generator=generator, output_type="np").images
    finally:
        diffusers_pipe.scheduler = original
    assert max_diff(result.images, (expected * 255).round().astype(np.uint8)) <= MAX_PIXEL_DIFF
    assert f"Seed resize from: {from_w}x{from_h}" in result.infotexts[0]
    assert settings_from_infotext(result.infotexts[0])["seed_resize_from_w"] == str(from_w)
    plain = local_pipeline.txt2img(Txt2ImgRequest(prompt="a lighthouse", sampler="Euler a", steps=6, seed=21,
                                                  width=64, height=64))
    assert max_diff(result.images, plain.images) > 3 * MAX_PIXEL_DIFF


def test_resize_seed_from_a_size_below_one_latent_cell_is_refused(local_pipeline):
    with pytest.raises(InvalidRequest) as caught:
        local_pipeline.txt2img(Txt2ImgRequest(prompt="x", steps=2, width=64, height=64, seed_resize_from_w=4,
                                              seed_resize_from_h=64))
    assert caught.value.field == "seed_resize_from_w"
