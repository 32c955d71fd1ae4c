"""Train the default model's canny ControlNet on its procedural scenes (sdtrt/pipeline/scenes.py), on the CPU,
deterministically.

    .venv/bin/python scripts/train_default_controlnet.py --out sdtrt/pipeline/weights/shapes_canny.safetensors

The default model's U-Net, text encoder and VAE stay frozen; the ControlNet starts as a copy of the U-Net's encoder
(diffusers' ``ControlNetModel.from_unet``, zero convolutions at zero) and learns to denoise a scene's latents given
its caption and its canny map, the map made exactly as a served unit makes it (requests/preprocessors: the
extension's canny at the default 100/200, most at pixel-perfect resolution, a tenth at the default 512 px
processor resolution fitted back by the extension's map resize). Captions are dropped as in the model's own
training, and a tenth of the maps are blank, so that the ControlNet also learns to leave an unsteered picture alone.
The result is the ControlNet in diffusers' layout as one float16 safetensors file: what `sdtrt export --controlnets`
reads, and what `sdtrt init-default --controlnets DIR` writes.
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
from sdtrt.pipeline.default_model import SHAPES_CONTROLNET_CONFIG, SHAPES_SEED, build_default_model
from sdtrt.pipeline.scenes import dataset, random_caption
from sdtrt.requests.controlnet import ControlUnit
from sdtrt.requests.preprocessors import preprocess, resize_map


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _canny_map(item: tuple[np.ndarray, bool]) -> np.ndarray:
    picture, pixel_perfect = item
    h, w = picture.shape[:2]
    unit = ControlUnit(module="canny", model="shapes_canny", pixel_perfect=pixel_perfect)
    return resize_map(preprocess(unit, picture, None, (w, h)), w, h, unit.resize_mode)


def canny_maps(pictures: np.ndarray, default_res_share: float, seed: int, workers: int) -> np.ndarray:
    """float32 [N, 3, H, W] in [0, 1]: each scene's canny map as a served unit makes it; ``default_res_share`` of
    them at the default 512 px processor resolution (its map resize thins the edges: 0.3 s a map, hence a share)."""
    from multiprocessing import Pool

    at_default = np.random.default_rng(seed).random(len(pictures)) < default_res_share
    with Pool(workers) as pool:
        maps = pool.map(_canny_map, [(p, not d) for p, d in zip(pictures, at_default)], chunksize=64)
    return np.stack(maps).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=SHAPES_SEED + 10)
    parser.add_argument("--default-res-share", type=float, default=0.1,
                        help="the share of maps made at the default processor resolution (the rest pixel-perfect)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as folder:
        pipe = StableDiffusionPipeline.from_pretrained(str(build_default_model(Path(folder) / "shapes", size="shapes")))
    unet, text_encoder, vae, tokenizer = pipe.unet.eval(), pipe.text_encoder.eval(), pipe.vae.eval(), pipe.tokenizer
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
    torch.manual_seed(args.seed)
    controlnet = ControlNetModel.from_unet(unet, **SHAPES_CONTROLNET_CONFIG)
    log(f"controlnet parameters: {sum(p.numel() for p in controlnet.parameters()):,}")

    pictures, scenes = dataset(args.scenes, args.seed + 1)
    hints = torch.from_numpy(canny_maps(pictures, args.default_res_share, args.seed + 2, args.threads))
    blank = torch.from_numpy(np.random.default_rng(args.seed + 3).random(len(scenes)) < 0.1)
    hints[blank] = 0
    with torch.no_grad():
        batches = [torch.from_numpy(pictures[i:i + 500]).permute(0, 3, 1, 2).float() / 127.5 - 1
                   for i in range(0, len(pictures), 500)]
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in batches]) * vae.config.scaling_factor
    log(f"{len(scenes)} scenes, {int((hints.amax(dim=(1, 2, 3)) > 0).sum())} with edges")

    noise_schedule = DDPMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k in (
        "beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})
    prediction = pipe.scheduler.config.prediction_type
    rng = np.random.default_rng(args.seed + 4)
    generator = torch.Generator().manual_seed(args.seed + 4)
    optimiser = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    average = {k: v.detach().clone() for k, v in controlnet.state_dict().items()}
    controlnet.train()
    for step in range(args.steps):
        index = rng.integers(0, len(scenes), size=args.batch)
        captions = [random_caption(scenes[i], rng) for i in index]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            context = text_encoder(ids)[0]
        clean = latents[torch.from_numpy(index)]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, t)
        down, mid = controlnet(noisy, t, context, controlnet_cond=hints[torch.from_numpy(index)], return_dict=False)
        predicted = unet(noisy, t, context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        target = noise_schedule.get_velocity(clean, noise, t) if prediction == "v_prediction" else noise
        loss = torch.nn.functional.mse_loss(predicted, target)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in controlnet.state_dict().items():
                average[k].lerp_(v, 1 - decay) if v.is_floating_point() else average[k].copy_(v)
        if step % 100 == 0 or step == args.steps - 1:
            log(f"controlnet {step}/{args.steps} loss {loss.item():.5f}")

    from safetensors.torch import save_file

    command = (f"scripts/train_default_controlnet.py --out {args.out} --steps {args.steps} --batch {args.batch} "
               f"--lr {args.lr} --ema {args.ema} --scenes {args.scenes} --default-res-share {args.default_res_share} --seed {args.seed}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    save_file({k: v.to(torch.float16).contiguous() for k, v in average.items()}, str(partial),
              metadata={"command": command, "torch": torch.__version__,
                        "config": json.dumps(dict(controlnet.config), default=list)})
    partial.replace(args.out)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
