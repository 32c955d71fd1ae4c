"""The VAE's latent distribution: sampling it with each image's own generator, as diffusers does."""

from __future__ import annotations

import torch


def sample_latents(parameters: torch.Tensor, generators: list[torch.Generator], scaling_factor: float) -> torch.Tensor:
    """parameters [1 or N, 2C, h, w] (mean and log-variance) -> scaled latents [N, C, h, w], image i drawn with
    generator i (diffusers' DiagonalGaussianDistribution.sample, then times the VAE scaling factor). The draws come
    from the CPU generators and move to the parameters' device, so a GPU loop keeps the seed contract."""
    mean, logvar = torch.chunk(parameters, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    draws = []
    for i, generator in enumerate(generators):
        row = min(i, mean.shape[0] - 1)  # one image's parameters serve every image of the batch
        noise = torch.randn((1, *mean.shape[1:]), generator=generator, dtype=mean.dtype).to(mean.device)
        draws.append(mean[row:row + 1] + std[row:row + 1] * noise)
    return torch.cat(draws) * scaling_factor
