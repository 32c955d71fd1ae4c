"""A1111-exact mode: an A1111 infotext gives the picture A1111 gives for the same checkpoint.

The reference is A1111 1.10's own code path (modules/processing.py, sd_samplers_kdiffusion.py, rng.py,
sd_hijack_clip.py), written out here on diffusers' networks and k-diffusion's sampling functions, and independent
of sdtrt's code: the prompt encoded as FrozenCLIPEmbedderWithCustomWords encodes one chunk (BOS, tokens, EOS padding;
Clip skip: the hidden state that many layers from the end, then the final layer norm), the CompVis denoiser and
CFGDenoiser around the U-Net, the sampler's sigmas for its schedule type, ImageRNG's noise (NV: an NVIDIA GPU's
numbers for the seed, then step noise from the same generator, ENSD's fresh generator for seed + delta), the hires
fix's Latent upscale (bilinear, no antialiasing) and its second pass as sample_img2img runs it (int(steps /
strength) steps of the schedule, the last ``steps`` of them, fresh noise), and the decode (clamped, x 255,
truncated to uint8). The only sdtrt function used is nv_randn, the NV numbers, which tests/test_a1111_seeds.py
checks against CUDA's own. sdtrt runs the infotext in-process (``k_diffusion``, the A1111-exact mode) and through
the A1111 gateway (an ``infotext`` request), and each picture must be within MAX_PIXEL_DIFF of A1111's.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from reference import MAX_PIXEL_DIFF, A1111Schedules, k_sampling, max_diff
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.philox import nv_randn
from sdtrt.requests.generation import settings_from_infotext
from sdtrt.requests.request import Txt2ImgRequest

INFOTEXTS = {
    "DPM++ 2M Karras, NV, ENSD, Clip skip 2, hires": (
        "a lighthouse on a cliff at dusk\nNegative prompt: blurry, low quality\n"
        "Steps: 10, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x64, "
        "Model hash: 0123456789, Model: default, Clip skip: 2, RNG: NV, ENSD: 31337, Denoising strength: 0.55, "
        "Hires upscale: 1.5, Hires steps: 6, Hires upscaler: Latent, Version: v1.10.1"),
    "Euler a, NV, ENSD": (
        "a red fox in the snow\nNegative prompt: ugly\n"
        "Steps: 9, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 64x80, "
        "Model hash: 0123456789, Model: default, RNG: NV, ENSD: 31337, Version: v1.10.1"),
    "Euler a, CPU, hires with its own steps": (
        "a castle in the clouds\n"
        "Steps: 8, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 7, Size: 64x64, Clip skip: 1, "
        "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 5, Hires upscaler: Latent, Version: v1.10.1"),
    "Euler a, hires resized to a width": (
        "a harbour at night\n"
        "Steps: 6, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 64x80, "
        "Denoising strength: 0.5, Hires resize: 104x0, Hires upscaler: Latent, Version: v1.10.1"),
    "DPM++ 2M, hires resized and cropped to another ratio": (
        "a harbour at noon\nNegative prompt: fog\n"
        "Steps: 6, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 6, Size: 64x80, RNG: NV, "
        "Denoising strength: 0.6, Hires resize: 120x96, Hires steps: 4, Hires upscaler: Latent, Version: v1.10.1"),
    "Euler a, hires with DPM++ 2M Karras": (
        "a windmill in a field\n"
        "Steps: 7, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 8, Size: 64x64, RNG: NV, "
        "ENSD: 31337, Denoising strength: 0.5, Hires upscale: 1.5, Hires upscaler: Latent, "
        "Hires sampler: DPM++ 2M, Hires schedule type: Karras, Version: v1.10.1"),
    "Euler a, hires with its own prompts": (
        "a quiet street\nNegative prompt: cars\n"
        "Steps: 6, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 12, Size: 64x64, "
        "Denoising strength: 0.6, Hires upscale: 1.5, Hires upscaler: Latent, Hires prompt: a quiet street in rain, "
        "Hires negative prompt: sunshine, Version: v1.10.1"),
    "DDIM": (
        "a lighthouse in fog\nNegative prompt: sunshine\n"
        "Steps: 10, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7, Seed: 21, Size: 64x64, Version: v1.10.1"),
    "DDIM CFG++, NV, Clip skip 2": (
        "a mountain village\nNegative prompt: blurry\n"
        "Steps: 8, Sampler: DDIM CFG++, Schedule type: Automatic, CFG scale: 4, Seed: 33, Size: 64x80, Clip skip: 2, "
        "RNG: NV, Version: v1.10.1"),
    "DDIM with eta, NV, ENSD": (
        "a stone bridge\nSteps: 7, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.5, Seed: 45, Size: 64x64, "
        "Eta DDIM: 0.6, RNG: NV, ENSD: 31337, Version: v1.10.1"),
    "PLMS, hires": (
        "a garden with a pond\nNegative prompt: people\n"
        "Steps: 7, Sampler: PLMS, Schedule type: Automatic, CFG scale: 6, Seed: 17, Size: 64x64, "
        "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 5, Hires upscaler: Latent, Version: v1.10.1"),
    "Euler a, hires with DDIM CFG++": (
        "a fishing boat\nSteps: 6, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 3, Size: 64x64, "
        "RNG: NV, Denoising strength: 0.7, Hires upscale: 1.5, Hires upscaler: Latent, Hires sampler: DDIM CFG++, "
        "Version: v1.10.1"),
    "UniPC": (
        "a tower by the sea\nNegative prompt: haze\n"
        "Steps: 9, Sampler: UniPC, Schedule type: Automatic, CFG scale: 7, Seed: 51, Size: 64x64, Version: v1.10.1"),
    "UniPC, NV, hires": (
        "a barn in a meadow\nSteps: 6, Sampler: UniPC, Schedule type: Automatic, CFG scale: 6, Seed: 52, "
        "Size: 64x64, RNG: NV, Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 5, Hires upscaler: Latent, "
        "Version: v1.10.1"),
    "Euler a, emphasis, a two-chunk prompt and a one-chunk negative": (
        "a (majestic lighthouse:1.3) on a rocky cliff at dusk, waves crashing below, seagulls circling, warm light in the windows, dramatic clouds, (oil painting:0.8), highly detailed, soft rim light, long exposure, misty sea, golden hour glow, tall grass on the cliff edge, a narrow path leading up, old stone walls, moss, lichen, weathered wood, rusty railings, distant ships, calm horizon, stars appearing, crescent moon, reflections on wet rocks, fine brush strokes, muted palette, cinematic composition, wide angle view\nNegative prompt: blurry, (low quality:1.2)\n"
        "Steps: 6, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 77, Size: 64x64, Version: v1.10.1"),
    "DPM++ 2M, the same texts padded to one length (Pad conds)": (
        "a (majestic lighthouse:1.3) on a rocky cliff at dusk, waves crashing below, seagulls circling, warm light in the windows, dramatic clouds, (oil painting:0.8), highly detailed, soft rim light, long exposure, misty sea, golden hour glow, tall grass on the cliff edge, a narrow path leading up, old stone walls, moss, lichen, weathered wood, rusty railings, distant ships, calm horizon, stars appearing, crescent moon, reflections on wet rocks, fine brush strokes, muted palette, cinematic composition, wide angle view\nNegative prompt: blurry, (low quality:1.2)\n"
        "Steps: 6, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 78, Size: 64x64, Pad conds: True, "
        "Version: v1.10.1"),
    "Euler a, the negative prompt lengthened to the prompt's by its last vector (Pad conds v0)": (
        "a (majestic lighthouse:1.3) on a rocky cliff at dusk, waves crashing below, seagulls circling, warm light in the windows, dramatic clouds, (oil painting:0.8), highly detailed, soft rim light, long exposure, misty sea, golden hour glow, tall grass on the cliff edge, a narrow path leading up, old stone walls, moss, lichen, weathered wood, rusty railings, distant ships, calm horizon, stars appearing, crescent moon, reflections on wet rocks, fine brush strokes, muted palette, cinematic composition, wide angle view\nNegative prompt: blurry, (low quality:1.2)\n"
        "Steps: 6, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 79, Size: 64x64, Pad conds v0: True, "
        "Version: v1.10.1"),
    "Heun, the negative prompt cut to the prompt's length (Pad conds v0)": (
        "a lighthouse at dusk\nNegative prompt: blurry, (low quality:1.2), a (majestic lighthouse:1.3) on a rocky cliff at dusk, waves crashing below, seagulls circling, warm light in the windows, dramatic clouds, (oil painting:0.8), highly detailed, soft rim light, long exposure, misty sea, golden hour glow, tall grass on the cliff edge, a narrow path leading up, old stone walls, moss, lichen, weathered wood, rusty railings\n"
        "Steps: 6, Sampler: Heun, Schedule type: Automatic, CFG scale: 7, Seed: 80, Size: 64x64, Pad conds v0: True, "
        "Version: v1.10.1"),
    "DDIM, a two-chunk prompt": (
        "a (majestic lighthouse:1.3) on a rocky cliff at dusk, waves crashing below, seagulls circling, warm light in the windows, dramatic clouds, (oil painting:0.8), highly detailed, soft rim light, long exposure, misty sea, golden hour glow, tall grass on the cliff edge, a narrow path leading up, old stone walls, moss, lichen, weathered wood, rusty railings, distant ships, calm horizon, stars appearing, crescent moon, reflections on wet rocks, fine brush strokes, muted palette, cinematic composition, wide angle view\nSteps: 6, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7, Seed: 79, Size: 64x64, "
        "Version: v1.10.1"),
    "Heun, Exponential, NV": (
        "a boat on a lake\nSteps: 6, Sampler: Heun, Schedule type: Exponential, CFG scale: 7, Seed: 99, "
        "Size: 80x64, RNG: NV, Version: v1.10.1"),
}
# A1111 1.10's k-diffusion function and Automatic schedule for the samplers above (sd_samplers_kdiffusion.py)
A1111_SAMPLERS = {"DPM++ 2M": ("sample_dpmpp_2m", "Karras"), "Euler a": ("sample_euler_ancestral", "Uniform"),
                  "Heun": ("sample_heun", "Uniform")}
# ... and its CompVis timestep samplers (sd_samplers_timesteps.py), which take no schedule type
TIMESTEP_SAMPLERS = ("DDIM", "DDIM CFG++", "PLMS", "UniPC")


class ImageRng:
    """A1111's ImageRNG for one image: its first draw from the seed's generator, the next ones continuing it (or,
    with ENSD, a fresh generator for seed + delta). CPU: torch's generator; NV: Philox, one offset per draw."""

    def __init__(self, seed: int, nv: bool, ensd: int):
        self.seed, self.nv, self.ensd, self.draws, self.first = seed, nv, ensd, 0, True
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.nv:
            noise = torch.from_numpy(nv_randn(self.seed, shape, self.draws))
        else:
            noise = torch.randn(shape, generator=self.generator)
        self.draws += 1
        if self.first and self.ensd:  # ImageRNG.first(): the step noise's generators are seed + delta's
            self.seed, self.draws = self.seed + self.ensd, 0
            self.generator = torch.Generator().manual_seed(self.seed)
        self.first = False
        return noise


class TorchHijack:
    """What k_diffusion.sampling sees as torch under A1111: randn_like is the image's next draw."""

    def __init__(self, rng: ImageRng):
        self.rng = rng

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x, *args, **kwargs):
        return self.rng.next(tuple(x.shape[1:]))[None]


def a1111_fragments(text: str) -> list[tuple[str, float]]:
    """parse_prompt_attention for the forms these infotexts use: plain text and ``(text:weight)``."""
    parts = []
    for plain, inner, weight in re.findall(r"([^(]+)|\(([^:()]+):([\d.]+)\)", text):
        parts.append((plain, 1.0) if plain else (inner, float(weight)))
    return parts


def a1111_text(pipe, text: str, clip_skip: int, backtrack: int = 20) -> torch.Tensor:
    """FrozenCLIPEmbedderWithCustomWords: each fragment tokenized by itself, 75-token chunks (one that fills up
    within ``backtrack`` tokens after a comma is cut there, the rest moved on: comma_padding_backtrack, 20), [BOS] + tokens + [EOS] padding, each chunk
    encoded, weighted and brought back to its mean (Clip skip: the hidden state that many layers from the end,
    then the final layer norm), the chunks side by side."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    comma = tokenizer.get_vocab()[","+"</w>"]
    chunks, tokens, weights, last_comma = [], [], [], -1

    def next_chunk():
        nonlocal tokens, weights, last_comma
        pad = 75 - len(tokens)
        chunks.append(([tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] * (pad + 1),
                       [1.0] + weights + [1.0] * (pad + 1)))
        tokens, weights, last_comma = [], [], -1

    for fragment, weight in a1111_fragments(text):
        for token in tokenizer(fragment, truncation=False, add_special_tokens=False)["input_ids"]:
            if token == comma:
                last_comma = len(tokens)
            elif backtrack != 0 and len(tokens) == 75 and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                moved = (tokens[last_comma + 1:], weights[last_comma + 1:])
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                next_chunk()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == 75:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        next_chunk()
    zs = []
    for ids, multipliers in chunks:
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
        if clip_skip <= 1:
            z = out.last_hidden_state
        else:
            norm = getattr(encoder, "text_model", encoder).final_layer_norm  # (transformers 5: on the model itself)
            z = norm(out.hidden_states[-clip_skip])
        original_mean = z.mean()
        z = z * torch.tensor(multipliers).reshape(1, -1, 1)
        zs.append(z * (original_mean / z.mean()))
    return torch.hstack(zs)


def a1111_eps(pipe, x_in, t_in, cond, uncond, pad: bool | str):
    """CFGDenoiser's U-Net calls, cond rows then uncond: one call when the texts are as long (or padded with the
    empty prompt's encoding, pad_cond_uncond; ``pad`` "v0": the uncond's last vector repeated to the cond's length,
    or the uncond cut to it, pad_cond_uncond_v0), else one each (A1111's default)."""
    if cond.shape[1] != uncond.shape[1] and pad == "v0":
        if uncond.shape[1] < cond.shape[1]:
            uncond = torch.hstack([uncond, uncond[:, -1:].repeat([1, cond.shape[1] - uncond.shape[1], 1])])
        else:
            uncond = uncond[:, :cond.shape[1]]
    elif cond.shape[1] != uncond.shape[1] and pad:
        empty = a1111_text(pipe, "", 1)
        longer = max(cond.shape[1], uncond.shape[1])
        cond, uncond = (torch.cat([c] + [empty] * ((longer - c.shape[1]) // 77), dim=1) for c in (cond, uncond))
    if cond.shape[1] == uncond.shape[1]:
        return pipe.unet(x_in, t_in, encoder_hidden_states=torch.cat([cond, uncond])).sample
    n = len(x_in) // 2
    return torch.cat([pipe.unet(x_in[:n], t_in[:n], encoder_hidden_states=cond).sample,
                      pipe.unet(x_in[n:], t_in[n:], encoder_hidden_states=uncond).sample])


def a1111_sample(pipe, schedules: A1111Schedules, function: str, x, sigmas, cond, uncond, cfg, rng, pad=False):
    """KDiffusionSampler.launch_sampling: k-diffusion's function on the CFG denoiser around the CompVis one."""
    sampling = k_sampling()

    def model(x, sigma, **_):
        x_in, s_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        t = torch.stack([schedules.sigma_to_t(float(s)).reshape(()) for s in s_in]).float()
        eps = a1111_eps(pipe, x_in / (s_in ** 2 + 1).sqrt().reshape(-1, 1, 1, 1), t, cond, uncond, pad)
        c, u = (x_in - eps * s_in.reshape(-1, 1, 1, 1)).chunk(2)
        return u + (c - u) * cfg

    extra = {"eta": 1.0, "s_noise": 1.0} if function == "sample_euler_ancestral" else {}
    original, sampling.torch = sampling.torch, TorchHijack(rng)
    try:
        return getattr(sampling, function)(model, x, sigmas.float(), disable=True, **extra)
    finally:
        sampling.torch = original


def a1111_hires_target(params: dict, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """StableDiffusionProcessingTxt2Img.calculate_target_resolution: (hr_upscale_to_x, _y), (truncate_x, _y)."""
    if "Hires resize" not in params:
        scale = float(params["Hires upscale"])
        return (int(width * scale), int(height * scale)), (0, 0)
    resize_x, resize_y = (int(v) for v in params["Hires resize"].split("x"))
    if resize_y == 0:
        return (resize_x, resize_x * height // width), (0, 0)
    if resize_x == 0:
        return (resize_y * width // height, resize_y), (0, 0)
    if width / height < resize_x / resize_y:
        to = (resize_x, resize_x * height // width)
    else:
        to = (resize_y * width // height, resize_y)
    return to, ((to[0] - resize_x) // 8, (to[1] - resize_y) // 8)


def compvis_timesteps(steps: int) -> torch.Tensor:
    """CompVisSampler.get_timesteps (no penultimate sigma to discard for these samplers)."""
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def unipc_log_alpha(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """uni_pc.NoiseScheduleVP('discrete').marginal_log_mean_coeff: log alpha piecewise linear over t_n = (n + 1) / N
    (interpolate_fn, extended past the ends by the outermost segments)."""
    log_alphas = (0.5 * torch.log(alphas_cumprod)).double()
    grid = torch.linspace(0., 1., len(log_alphas) + 1)[1:].double()
    out = []
    for value in t.reshape(-1).double():
        k = int(torch.clamp(torch.searchsorted(grid, value), 1, len(grid) - 1))
        out.append(log_alphas[k - 1] + (value - grid[k - 1]) * (log_alphas[k] - log_alphas[k - 1])
                   / (grid[k] - grid[k - 1]))
    return torch.stack(out).float()


def unipc_grid(alphas_cumprod, t_start: float, steps: int, skip_type: str) -> torch.Tensor:
    """uni_pc.UniPC.get_time_steps: time_uniform, time_quadratic (t_order 2) or logSNR (NoiseScheduleVP's
    marginal_lambda at both ends, evenly spaced, inverse_lambda through the flipped log-alpha table)."""
    t_0 = 1. / 1000
    if skip_type == "time_quadratic":
        return torch.linspace(t_start ** 0.5, t_0 ** 0.5, steps + 1).pow(2)
    if skip_type == "time_uniform":
        return torch.linspace(float(t_start), t_0, steps + 1)
    ends = unipc_log_alpha(alphas_cumprod, torch.tensor([float(t_start), t_0]))
    lam = (ends - 0.5 * torch.log(1. - torch.exp(2. * ends))).tolist()
    lambdas = torch.linspace(lam[0], lam[1], steps + 1).double()
    log_alpha = -0.5 * torch.logaddexp(torch.zeros(1, dtype=torch.float64), -2. * lambdas)
    table = (0.5 * torch.log(alphas_cumprod)).double().numpy()[::-1]
    times = torch.linspace(0., 1., len(alphas_cumprod) + 1)[1:].double().numpy()[::-1]
    return torch.from_numpy(np.interp(log_alpha.numpy(), table, times)).float()


def a1111_unipc(eps_model, x, timesteps, alphas_cumprod, img2img: bool, variant: str = "bh1", order: int = 3,
                skip_type: str = "time_uniform", lower_order_final: bool = True):
    """sd_samplers_timesteps_impl.unipc with A1111's UniPC options (its defaults: variant bh1, order 3,
    time_uniform, lower order final): uni_pc.UniPC.sample's multistep loop and multistep_uni_pc_bh_update
    (predict_x0; B(h) = h for bh1, e^h - 1 for bh2), the model at (t - 1 / N) x 1000
    (UniPCCFG.get_model_input_time)."""
    steps = len(timesteps)
    t_start = timesteps[-1] / 1000 + 1 / 1000 if img2img else 1.0
    grid = unipc_grid(alphas_cumprod, float(t_start), steps, skip_type)
    log_alpha = lambda t: unipc_log_alpha(alphas_cumprod, t)  # noqa: E731
    sigma = lambda t: torch.sqrt(1. - torch.exp(2. * log_alpha(t)))  # noqa: E731
    lam = lambda t: log_alpha(t) - 0.5 * torch.log(1. - torch.exp(2. * log_alpha(t)))  # noqa: E731

    def model_fn(x, t):  # data prediction from the guided noise prediction
        noise = eps_model(x, (t - 1. / 1000) * 1000.)
        return (x - sigma(t) * noise) / torch.exp(log_alpha(t))

    def update(x, models, times, t, k, use_corrector):
        h = lam(t) - lam(times[-1])
        rks, d1s = [], []
        for i in range(1, k):
            rk = ((lam(times[-(i + 1)]) - lam(times[-1])) / h)[0]
            rks.append(rk)
            d1s.append((models[-(i + 1)] - models[-1]) / rk)
        rks = torch.tensor(rks + [1.])
        hh = -h[0]
        h_phi_1, factorial = torch.expm1(hh), 1
        h_phi_k, b_h, rows, b = h_phi_1 / hh - 1, hh if variant == "bh1" else torch.expm1(hh), [], []
        for i in range(1, k + 1):
            rows.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r, b = torch.stack(rows), torch.tensor(b)
        alpha_t = torch.exp(log_alpha(t))
        x_t_ = sigma(t) / sigma(times[-1]) * x - alpha_t * h_phi_1 * models[-1]
        pred = 0
        if d1s:
            d1s = torch.stack(d1s, dim=1)
            rhos_p = torch.tensor([0.5]) if k == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1])
            pred = torch.einsum("k,bkchw->bchw", rhos_p, d1s)
        x_t = x_t_ - alpha_t * b_h * pred
        if not use_corrector:
            return x_t, None
        model_t = model_fn(x_t, t)
        rhos_c = torch.tensor([0.5]) if k == 1 else torch.linalg.solve(r, b)
        corr = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1s) if len(d1s) else 0
        return x_t_ - alpha_t * b_h * (corr + rhos_c[-1] * (model_t - models[-1])), model_t

    times, models = [grid[0].reshape(1)], [model_fn(x, grid[0].reshape(1))]
    for init_order in range(1, order):
        t = grid[init_order].reshape(1)
        x, model_x = update(x, models, times, t, init_order, True)
        models.append(model_x)
        times.append(t)
    for step in range(order, steps + 1):
        t = grid[step].reshape(1)
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = update(x, models, times, t, step_order, step != steps)
        models, times = models[1:] + [model_x], times[1:] + [t]
    return x


def a1111_timestep_sample(pipe, schedules: A1111Schedules, sampler: str, x, timesteps, cond, uncond, cfg, rng,
                          eta: float = 0.0, img2img: bool = False, unipc: dict | None = None):
    """CompVisSampler.launch_sampling: sd_samplers_timesteps_impl's ddim, ddim_cfgpp or plms on
    CFGDenoiserTimesteps (CFG on the noise predictions, cond rows then uncond; CFG++'s scale multiplier 1 / 12.5 and
    its last_noise_uncond) around CompVisTimestepsDenoiser."""
    multiplier, last = (1 / 12.5 if sampler == "DDIM CFG++" else 1.0), {}
    noise = TorchHijack(rng)

    def model(x, t):
        eps = a1111_eps(pipe, torch.cat([x, x]), torch.cat([t, t]), cond, uncond, False)
        c, u = eps.chunk(2)
        last["uncond"] = torch.clone(u)
        return u + (c - u) * (cfg * multiplier)

    alphas_cumprod = schedules.alphas_cumprod
    if sampler == "UniPC":
        return a1111_unipc(lambda x, t: model(x, t.expand(x.shape[0])), x, timesteps, alphas_cumprod, img2img,
                           **(unipc or {}))
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    sigmas = eta * np.sqrt((1 - alphas_prev.numpy()) / (1 - alphas) * (1 - alphas / alphas_prev.numpy()))
    s_in, s_x = x.new_ones((x.shape[0])), x.new_ones((x.shape[0], 1, 1, 1))

    def x_prev_and_x0(x, e_t, index, sigma_t=0.0, direction=None):
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus_alphas[index].item() * s_x * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * (e_t if direction is None else direction)
        return a_prev.sqrt() * pred_x0 + dir_xt, pred_x0

    old_eps = []
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        if sampler != "PLMS":  # ddim, ddim_cfgpp
            sigma_t = sigmas[index].item() * s_x
            direction = last["uncond"] if sampler == "DDIM CFG++" else None
            x = x_prev_and_x0(x, e_t, index, sigma_t, direction)[0] + sigma_t * noise.randn_like(x)
            continue
        if not old_eps:  # pseudo improved Euler
            x_ahead, _ = x_prev_and_x0(x, e_t, index)
            e_prime = (e_t + model(x_ahead, timesteps[max(index - 1, 0)].item() * s_in)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_and_x0(x, e_prime, index)[0]
        old_eps = (old_eps + [e_t])[-3:]
    return x


def a1111_hires_pass(pipe, schedules, params, latents, width, height, rng_args, texts, cfg):
    """sample_hr_pass (Latent), then sample_img2img with the hires pass's own steps, prompts and sampler."""
    strength, steps = float(params["Denoising strength"]), int(params["Steps"])
    cond, uncond, clip_skip = texts
    (to_x, to_y), (cut_x, cut_y) = a1111_hires_target(params, width, height)
    latents = torch.nn.functional.interpolate(latents, size=(to_y // 8, to_x // 8), mode="bilinear",
                                              antialias=False)
    latents = latents[:, :, cut_y // 2:latents.shape[2] - (cut_y + 1) // 2,
                      cut_x // 2:latents.shape[3] - (cut_x + 1) // 2]
    hr_height, hr_width = latents.shape[2] * 8, latents.shape[3] * 8
    hr_steps = int(params.get("Hires steps", 0)) or steps
    total, t_enc = int(hr_steps / min(strength, 0.999)), hr_steps - 1
    if "Hires prompt" in params:  # hr_c and hr_uc: the hires pass's own prompts
        cond = a1111_text(pipe, params["Hires prompt"], clip_skip)
    if "Hires negative prompt" in params:
        uncond = a1111_text(pipe, params["Hires negative prompt"], clip_skip)
    sampler = params.get("Hires sampler", params["Sampler"])  # p.hr_sampler_name, else the first pass's
    rng = ImageRng(*rng_args)  # the second pass's own ImageRNG, at its size
    noise = rng.next((4, hr_height // 8, hr_width // 8))[None]
    if sampler in TIMESTEP_SAMPLERS:  # CompVisSampler.sample_img2img
        timesteps = compvis_timesteps(total)
        alpha = schedules.alphas_cumprod[timesteps[t_enc]]
        xi = latents * torch.sqrt(alpha) + noise * torch.sqrt(1 - alpha)
        return a1111_timestep_sample(pipe, schedules, sampler, xi, timesteps[:t_enc], cond, uncond, cfg, rng,
                                     img2img=True)
    function, automatic = A1111_SAMPLERS[sampler]
    label = params.get("Hires schedule type", params["Schedule type"])  # p.hr_scheduler, else the first pass's
    sigma_sched = schedules.sigmas(automatic if label == "Automatic" else label, total)[total - t_enc - 1:]
    xi = latents + noise * sigma_sched[0].float()
    return a1111_sample(pipe, schedules, function, xi, sigma_sched, cond, uncond, cfg, rng)


@torch.no_grad()
def a1111_picture(pipe, infotext: str) -> np.ndarray:
    prompt, _, rest = infotext.partition("\n")
    negative = rest.split("\n")[0].removeprefix("Negative prompt: ") if rest.startswith("Negative prompt: ") else ""
    params = dict(p.split(": ", 1) for p in infotext.rsplit("\n", 1)[-1].split(", "))
    steps, cfg, seed = int(params["Steps"]), float(params["CFG scale"]), int(params["Seed"])
    width, height = (int(v) for v in params["Size"].split("x"))
    clip_skip, nv, ensd = int(params.get("Clip skip", 1)), params.get("RNG") == "NV", int(params.get("ENSD", 0))
    schedules = A1111Schedules(pipe.scheduler.config)
    cond, uncond = a1111_text(pipe, prompt, clip_skip), a1111_text(pipe, negative, clip_skip)

    rng = ImageRng(seed, nv, ensd)
    x = rng.next((4, height // 8, width // 8))[None]
    if params["Sampler"] in TIMESTEP_SAMPLERS:
        latents = a1111_timestep_sample(pipe, schedules, params["Sampler"], x, compvis_timesteps(steps), cond, uncond,
                                        cfg, rng, eta=float(params.get("Eta DDIM", 0.0)))
    else:
        function, automatic = A1111_SAMPLERS[params["Sampler"]]
        sigmas = schedules.sigmas(automatic if params["Schedule type"] == "Automatic" else params["Schedule type"],
                                  steps)
        latents = a1111_sample(pipe, schedules, function, x * sigmas[0].float(), sigmas, cond, uncond, cfg, rng,
                               pad="v0" if params.get("Pad conds v0") == "True" else params.get("Pad conds") == "True")
    if "Hires upscale" in params or "Hires resize" in params:
        latents = a1111_hires_pass(pipe, schedules, params, latents, width, height, (seed, nv, ensd),
                                   (cond, uncond, clip_skip), cfg)
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)[0]
    return (255.0 * image.permute(1, 2, 0).numpy()).astype(np.uint8)[None]


def request_from(infotext: str) -> Txt2ImgRequest:
    fields = set(Txt2ImgRequest.__dataclass_fields__)
    settings = {k: v for k, v in settings_from_infotext(infotext).items() if k in fields}
    return Txt2ImgRequest(**settings, k_diffusion=True)


@pytest.fixture(scope="module")
def expected(diffusers_pipe):
    return {name: a1111_picture(diffusers_pipe, text) for name, text in INFOTEXTS.items()}


@pytest.mark.parametrize("name", list(INFOTEXTS))
def test_an_a1111_infotext_gives_a1111s_picture_in_process(name, local_pipeline, expected):
    result = local_pipeline.txt2img(request_from(INFOTEXTS[name]))
    assert max_diff(result.images, expected[name]) <= MAX_PIXEL_DIFF
    assert result.images.std() > 1.0


@pytest.mark.parametrize("name", list(INFOTEXTS))
def test_an_a1111_infotext_gives_a1111s_picture_through_the_gateway(name, server, expected):
    """An A1111 client sending the infotext (A1111 1.10 API's infotext field); the gateway runs A1111's code paths."""
    api = TestClient(create_app(Client(server.url)))
    response = api.post("/sdapi/v1/txt2img", json={"infotext": INFOTEXTS[name]})  # (a prompt sent wins, as in A1111)
    assert response.status_code == 200, response.text[:1000]
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))
    assert max_diff(picture[None], expected[name]) <= MAX_PIXEL_DIFF
    info = json.loads(response.json()["info"])
    assert f"Seed: {INFOTEXTS[name].split('Seed: ')[1].split(',')[0]}" in info["infotexts"][0]


@pytest.mark.parametrize("name", ["DPM++ 2M Karras, NV, ENSD, Clip skip 2, hires", "PLMS, hires", "UniPC"])
def test_the_diffusers_path_is_not_a1111s_where_they_differ(name, local_pipeline, expected):
    """Without the mode, the hires pass runs diffusers' img2img steps (PLMS on diffusers' timesteps): another
    picture (this is what the mode changes, so the tests above can fail)."""
    request = request_from(INFOTEXTS[name])
    plain = local_pipeline.txt2img(Txt2ImgRequest(**{**request.as_dict(), "k_diffusion": False}))
    assert max_diff(plain.images, expected[name]) > MAX_PIXEL_DIFF


@pytest.mark.parametrize("name", [name for name in INFOTEXTS if "(Pad conds v0)" in name])
def test_pad_conds_v0_changes_the_picture(name, diffusers_pipe, expected):
    """The v0 pictures above are not A1111's default ones (each text at its own length): the reference can fail."""
    default = a1111_picture(diffusers_pipe, INFOTEXTS[name].replace("Pad conds v0: True, ", ""))
    assert max_diff(default, expected[name]) > MAX_PIXEL_DIFF
