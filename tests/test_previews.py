"""Live previews (sdtrt.contract.previews): the export's fit of latents -> colours, and the picture laid out per batch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from sdtrt.export.vaes import fit_latent_preview, scenes
from sdtrt.contract.previews import grid, latent_preview


class LinearEncoderVae(torch.nn.Module):
    """A stand-in whose encoder is a known linear map of each 8x8 cell's mean colour (plus an offset): the fit
    must find that map's inverse. Not a diffusers model on purpose: no trained VAE can be had offline, and a
    random one has no colour map to recover (its fit is as arbitrary as its pictures)."""

    dtype = torch.float32

    def __init__(self, mix: torch.Tensor, offset: torch.Tensor):
        super().__init__()
        self.mix, self.offset = mix, offset

    def encode(self, pixels: torch.Tensor):
        colours = torch.nn.functional.avg_pool2d((pixels + 1) / 2, 8)  # [-1, 1] in, as diffusers' VAEs take
        mean = torch.einsum("bchw,cl->blhw", colours, self.mix) + self.offset[None, :, None, None]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


def test_the_fit_recovers_a_linear_colour_map():
    mix = torch.tensor([[0.9, -0.3, 0.2, 0.1], [0.2, 0.8, -0.4, 0.3], [-0.1, 0.3, 0.7, -0.6]])
    offset = torch.tensor([0.1, -0.2, 0.05, 0.3])
    vae = LinearEncoderVae(mix, offset)
    matrix = fit_latent_preview(vae, scaling_factor=0.5, vae_scale_factor=8)
    assert np.asarray(matrix).shape == (5, 3)
    pictures = torch.from_numpy(scenes(3, 64, seed=7))  # pictures the fit never saw
    latents = vae.encode(pictures * 2 - 1).latent_dist.mean * 0.5
    truth = torch.nn.functional.avg_pool2d(pictures, 8).permute(0, 2, 3, 1).numpy()
    preview = latent_preview(latents[:1].numpy(), matrix)
    assert preview.shape == (8, 8, 3) and preview.dtype == np.uint8
    assert np.abs(preview.astype(float) - truth[0] * 255).max() <= 1.0


def test_scenes_are_deterministic_and_varied():
    a, b = scenes(4, 32, seed=3), scenes(4, 32, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, scenes(4, 32, seed=4))
    assert a.min() >= 0 and a.max() <= 1 and a.std(axis=(2, 3)).mean() > 0.02  # not flat fields


def test_a_batch_previews_as_a_grid():
    images = np.stack([np.full((2, 3, 3), i + 1, np.uint8) for i in range(3)])
    out = grid(images)
    assert out.shape == (4, 6, 3)  # 2 columns, 2 rows, the fourth cell black
    assert out[0, 0, 0] == 1 and out[0, 3, 0] == 2 and out[2, 0, 0] == 3 and out[2, 3, 0] == 0
