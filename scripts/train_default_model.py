"""Train the embedded default model on procedural scenes (sdtrt/pipeline/scenes.py), on the CPU, deterministically.

    .venv/bin/python scripts/train_default_model.py --out sdtrt/pipeline/weights/shapes.safetensors

Two phases, each seeded: the VAE learns to reconstruct scenes (64x64 pixels <-> 4x8x8 latents), then the text
encoder and the U-Net learn to denoise the scenes' latents given their captions (v-prediction on SD 1.x's
noise schedule, captions dropped 10% of the time for classifier-free guidance). The result is one safetensors
file with the three networks' weights in float16; `sdtrt init-default` turns it into a diffusers folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sdtrt.contract.architectures import SCHEDULER
from sdtrt.pipeline.clip_vocab import write_clip_tokenizer
from sdtrt.pipeline.default_model import SHAPES_CONFIGS, SHAPES_SEED, save_trained
from sdtrt.pipeline.scenes import dataset, random_caption, random_scene


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_tensor(pictures: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, steps: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        # 32x32 crops: the VAE is convolutional, and a quarter of the pixels is a quarter of the time
        corners = rng.integers(0, 33, size=(batch, 2))
        pictures = to_tensor(np.stack([random_scene(rng).render()[y:y + 32, x:x + 32] for x, y in corners]))
        posterior = vae.encode(pictures).latent_dist
        recon = vae.decode(posterior.sample(torch.Generator().manual_seed(seed + step))).sample
        loss = torch.nn.functional.mse_loss(recon, pictures) + 1e-5 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {loss.item():.5f}")
    vae.eval()


def train_denoiser(text_encoder, unet, tokenizer, latents: torch.Tensor, scenes, steps: int, batch: int, seed: int,
                   lr: float, ema_decay: float, prediction_type: str, snapshot=None, snapshot_every: int = 0):
    """Returns the exponential moving average of the weights (what is saved): a short diffusion training run
    samples far cleaner from its EMA than from its last step."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k in (
        "beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.05)
    averages = {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
                for name, module in (("text_encoder", text_encoder), ("unet", unet))}
    unet.train()
    text_encoder.train()
    for step in range(steps):
        index = rng.integers(0, len(scenes), size=batch)
        captions = [random_caption(scenes[i], rng) for i in index]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        clean = latents[torch.from_numpy(index)]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, t)
        context = text_encoder(ids)[0]
        target = noise_schedule.get_velocity(clean, noise, t) if prediction_type == "v_prediction" else noise
        loss = torch.nn.functional.mse_loss(unet(noisy, t, context).sample, target)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early averages would remember the random init
        with torch.no_grad():
            for name, module in (("text_encoder", text_encoder), ("unet", unet)):
                for k, v in module.state_dict().items():
                    if v.is_floating_point():
                        averages[name][k].lerp_(v, 1 - decay)
                    else:
                        averages[name][k].copy_(v)
        if step % 100 == 0 or step == steps - 1:
            log(f"denoiser {step}/{steps} loss {loss.item():.5f}")
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            snapshot(averages, step + 1)
    unet.eval()
    text_encoder.eval()
    return averages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--denoiser-steps", type=int, default=10000)
    parser.add_argument("--denoiser-batch", type=int, default=96)
    parser.add_argument("--denoiser-lr", type=float, default=1e-3)
    parser.add_argument("--prediction", choices=["v_prediction", "epsilon"], default="v_prediction",
                        help="what the U-Net predicts. v: its loss weighs the noisiest steps, where the layout (which "
                        "the position words decide) is drawn, far more than epsilon's does")
    parser.add_argument("--ema", type=float, default=0.999, help="decay of the weights' moving average")
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=SHAPES_SEED)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--snapshot-every", type=int, default=0, metavar="STEPS",
                        help="also write the averaged weights so far to OUT.partial every STEPS denoiser steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(folder) / "tokenizer")))
    torch.manual_seed(args.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SHAPES_CONFIGS["text"]))
    torch.manual_seed(args.seed + 1)
    unet = UNet2DConditionModel(**SHAPES_CONFIGS["unet"])
    torch.manual_seed(args.seed + 2)
    vae = AutoencoderKL(**SHAPES_CONFIGS["vae"])
    log(f"parameters: text {sum(p.numel() for p in text_encoder.parameters()):,}, "
        f"unet {sum(p.numel() for p in unet.parameters()):,}, vae {sum(p.numel() for p in vae.parameters()):,}")

    train_vae(vae, args.vae_steps, args.vae_batch, args.seed)
    pictures, scenes = dataset(args.scenes, args.seed + 3)
    with torch.no_grad():
        means = torch.cat([vae.encode(to_tensor(pictures[i:i + 500])).latent_dist.mean
                           for i in range(0, len(pictures), 500)])
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latent scaling factor {scaling:.5f}")
    command = " ".join(["scripts/train_default_model.py", f"--out {args.out}", f"--vae-steps {args.vae_steps}",
                        f"--vae-batch {args.vae_batch}", f"--denoiser-steps {args.denoiser_steps}",
                        f"--denoiser-batch {args.denoiser_batch}", f"--denoiser-lr {args.denoiser_lr}",
                        f"--prediction {args.prediction}", f"--ema {args.ema}", f"--scenes {args.scenes}", f"--seed {args.seed}"])

    def save(averages: dict, path: Path, steps: int) -> None:
        save_trained(path, {**averages, "vae": vae.state_dict()}, scaling, args.prediction, command=command,
                     denoiser_steps_done=str(steps), torch=torch.__version__, configs=json.dumps(SHAPES_CONFIGS))
        log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {steps} denoiser steps)")

    averages = train_denoiser(
        text_encoder, unet, tokenizer, means * scaling, scenes, args.denoiser_steps, args.denoiser_batch,
        args.seed + 4, args.denoiser_lr, args.ema, args.prediction, snapshot_every=args.snapshot_every,
        snapshot=lambda state, steps: save(state, args.out.with_suffix(".partial"), steps))
    save(averages, args.out, args.denoiser_steps)


if __name__ == "__main__":
    main()
