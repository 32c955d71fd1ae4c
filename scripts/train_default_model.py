"""Train the embedded default model on procedural scenes (sdtrt/scenes.py), on the CPU, deterministically.

    .venv/bin/python scripts/train_default_model.py --out sdtrt/weights/shapes.safetensors

Two phases, each seeded: the VAE learns to reconstruct scenes (64x64 pixels <-> 4x8x8 latents), then the text
encoder and the U-Net learn to denoise the scenes' latents given their captions (epsilon prediction on SD 1.x's
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

from sdtrt.architectures import SCHEDULER
from sdtrt.clip_vocab import write_clip_tokenizer
from sdtrt.default_model import SHAPES_CONFIGS, SHAPES_SEED
from sdtrt.scenes import dataset, random_caption, random_scene


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


def train_denoiser(text_encoder, unet, tokenizer, latents: torch.Tensor, scenes, steps: int, batch: int, seed: int):
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k in (
        "beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type")})
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=5e-4, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=5e-4, total_steps=steps, pct_start=0.05)
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
        loss = torch.nn.functional.mse_loss(unet(noisy, t, context).sample, noise)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"denoiser {step}/{steps} loss {loss.item():.5f}")
    unet.eval()
    text_encoder.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--denoiser-steps", type=int, default=4000)
    parser.add_argument("--denoiser-batch", type=int, default=96)
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=SHAPES_SEED)
    parser.add_argument("--threads", type=int, default=2)
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
    train_denoiser(text_encoder, unet, tokenizer, means * scaling, scenes, args.denoiser_steps,
                    args.denoiser_batch, args.seed + 4)

    from safetensors.torch import save_file

    weights = {f"{prefix}.{name}": value.detach().to(torch.float16).contiguous()
               for prefix, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))
               for name, value in module.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["scripts/train_default_model.py", f"--out {args.out}", f"--vae-steps {args.vae_steps}",
                        f"--vae-batch {args.vae_batch}", f"--denoiser-steps {args.denoiser_steps}",
                        f"--denoiser-batch {args.denoiser_batch}", f"--scenes {args.scenes}", f"--seed {args.seed}"])
    save_file(weights, str(args.out), metadata={"vae_scaling_factor": repr(scaling), "command": command,
                                               "torch": torch.__version__, "configs": json.dumps(SHAPES_CONFIGS)})
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
