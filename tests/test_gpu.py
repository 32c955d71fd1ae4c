"""GPU checks, all behind the ``gpu`` marker (``pytest -m gpu`` on a GPU host runs every one of them).

* The denoising loop on the GPU (needs only PyTorch with CUDA and diffusers): the served job models (txt2img,
  img2img) run ``sdtrt.pipeline.jobs`` with its latents on the GPU between network calls; here the same jobs drive diffusers' own
  networks on the GPU and must give diffusers' pipeline's picture.
* The served TensorRT path (needs NVIDIA's tritonserver and TensorRT, e.g. the docker/ image): ``sdtrt export
  --format trt`` served by tritonserver against diffusers FP16 on the same weights.
(TensorRT engines against onnxruntime, and refit, are in test_tensorrt.py.)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff
from sdtrt.requests.request import Txt2ImgRequest

HAS_CUDA = torch.cuda.is_available()
TRITONSERVER = os.environ.get("SDTRT_TRITONSERVER", "/opt/tritonserver/bin/tritonserver")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

pytestmark = pytest.mark.gpu  # every test here; `pytest -m gpu` selects them (and test_tensorrt.py's)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
needs_trt = pytest.mark.skipif(not (HAS_CUDA and HAS_TENSORRT), reason=(
    "needs an NVIDIA GPU and TensorRT (pip install 'sdtrt[gpu]', or the docker/ image)"))
needs_triton = pytest.mark.skipif(not Path(TRITONSERVER).is_file(), reason=(
    f"needs NVIDIA's tritonserver with the TensorRT backend ({TRITONSERVER}; set SDTRT_TRITONSERVER)"))

# FP16 vs FP16. diffusers' FP16 pipeline draws its random numbers in FP16, which some PyTorch builds (2.11 with
# CUDA 13, checked on an H100) turn into another sequence than the FP32 draw of the same seed, so its picture is
# a different picture (mean difference 48/255). sdtrt, like A1111, draws FP32 noise from the seed. The FP16
# reference therefore gets the seed's FP32 noise as its ``latents`` and the comparison uses deterministic
# samplers (no step noise): what remains is FP16 arithmetic. Both sides run the U-Net in FP16 on the same weights, but not the same kernels (TensorRT fuses and
# picks its own; diffusers runs PyTorch's SDPA) and sdtrt keeps the latents in FP32 between steps where diffusers
# keeps FP16. FP16 carries ~3 decimal digits, each step's noise prediction differs by a few 1e-3 of its scale,
# and 20 steps feed that back through the sampler, so single pixels can move by several levels while the
# picture stays the same: held to a mean absolute difference of 2/255 and a PSNR of 35 dB (FP16 SD pipelines
# against each other typically land at 40+ dB; a wrong conditioning, schedule or seed gives under 20 dB).
FP16_MEAN_TOLERANCE = 2.0
FP16_PSNR_DB = 35.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def assert_fp16_close(actual: np.ndarray, expected: np.ndarray) -> None:
    mean = np.abs(actual.astype(np.float64) - expected.astype(np.float64)).mean()
    assert mean <= FP16_MEAN_TOLERANCE and psnr(actual, expected) >= FP16_PSNR_DB, (mean, psnr(actual, expected))


@pytest.fixture(scope="module")
def cuda_pipe(default_model):
    from diffusers import StableDiffusionPipeline

    def load(dtype):
        pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, dtype=dtype,
                                                       safety_checker=None).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


class TorchNetworks:
    """diffusers' networks on the GPU, behind the interface the jobs call (``sdtrt.pipeline.jobs.Networks``), as the served
    loop calls the TensorRT engines: FP32 tensors in and out on the loop's device. Records where inputs were."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.device = pipe.device
        self.dtype = pipe.unet.dtype
        self.input_devices: set[str] = set()

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
        context = conditioning["encoder_hidden_states"]
        self.input_devices |= {t.device.type for t in (sample, timestep, context)}
        with torch.no_grad():
            return self.pipe.unet(sample.to(self.dtype), timestep, encoder_hidden_states=context.to(self.dtype)).sample.float()

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("txt2img without hires fix never encodes")

    def vae_decode(self, latents: torch.Tensor) -> np.ndarray:
        from sdtrt.contract.images import to_uint8

        with torch.no_grad():
            decoded = self.pipe.vae.decode(latents.to(self.dtype)).sample.float()
        return to_uint8(decoded.cpu().numpy())


def sdtrt_loop_on_gpu(spec, pipe, request: Txt2ImgRequest) -> tuple[np.ndarray, TorchNetworks]:
    from sdtrt.pipeline.conditioning import ScheduledConditioning
    from sdtrt.pipeline.jobs import Prompts, txt2img_latents
    from sdtrt.requests.plan import plan_request

    plan = plan_request(request, spec)
    request = plan.request
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(request.prompt, pipe.device, 1, True, negative_prompt=request.negative_prompt)
    nets = TorchNetworks(pipe)
    prompts = Prompts(ScheduledConditioning([(request.steps, {"encoder_hidden_states": uncond.float()},
                                              ({"encoder_hidden_states": cond.float()},))]))
    latents = txt2img_latents(plan, prompts, nets)
    assert latents.device.type == "cuda"  # the loop's latents never left the GPU
    return nets.vae_decode(latents), nets


def diffusers_fp16_images(pipe, *, prompt: str, negative_prompt: str, sampler: str, steps: int, cfg: float,
                          seed: int, width: int, height: int, batch_size: int = 1) -> np.ndarray:
    """diffusers' FP16 pipeline, one call per image, each started from the FP32 noise of seed + i (the seed
    contract: torch.randn((1, 4, h, w)) from a CPU generator) as its latents."""
    from reference import reference_scheduler

    original, images = pipe.scheduler, []
    for i in range(batch_size):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        f = pipe.vae_scale_factor
        noise = torch.randn((1, pipe.unet.config.in_channels, height // f, width // f), generator=generator)
        pipe.scheduler = reference_scheduler(sampler, original.config, seed + i)
        out = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=cfg,
                   width=width, height=height, latents=noise.to(pipe.device, pipe.unet.dtype), generator=generator,
                   output_type="np").images
        images.append((out[0] * 255).round().astype(np.uint8))
    pipe.scheduler = original
    return np.stack(images)


PROMPT = dict(prompt="a lighthouse at dawn", negative_prompt="blurry")


@needs_cuda
@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "DPM++ 2M Karras"])
def test_denoising_loop_on_the_gpu_gives_diffusers_picture(exported_repo, cuda_pipe, sampler):
    """sdtrt's loop with its latents on the GPU (as the GPU scheduler instances run it) against diffusers'
    FP32 pipeline on the same GPU, weights, seed and sampler: the same picture as on the CPU."""
    from sdtrt.contract.spec import load_spec

    pipe = cuda_pipe(torch.float32)
    request = Txt2ImgRequest(**PROMPT, sampler=sampler, steps=12, seed=42, width=128, height=96)
    ours, nets = sdtrt_loop_on_gpu(load_spec(exported_repo), pipe, request)
    assert nets.input_devices == {"cuda"}  # every U-Net call was fed from GPU memory
    expected = diffusers_images(pipe, **PROMPT, sampler=sampler, steps=12, cfg=7.0, seed=42, width=128, height=96)
    assert max_diff(ours, expected) <= MAX_PIXEL_DIFF


@needs_cuda
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras"])
def test_denoising_loop_with_fp16_networks_stays_with_diffusers_fp16(exported_repo, cuda_pipe, sampler):
    """The same loop with FP16 networks (what the TensorRT engines are) against diffusers FP16."""
    from sdtrt.contract.spec import load_spec

    pipe = cuda_pipe(torch.float16)
    request = Txt2ImgRequest(**PROMPT, sampler=sampler, steps=12, seed=42, width=128, height=96)
    ours, _ = sdtrt_loop_on_gpu(load_spec(exported_repo), pipe, request)
    expected = diffusers_fp16_images(pipe, **PROMPT, sampler=sampler, steps=12, cfg=7.0, seed=42, width=128,
                                     height=96)
    assert_fp16_close(ours, expected)


# --- the served TensorRT path ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_server(default_model, tmp_path_factory):
    from servers import free_ports

    from sdtrt.export import export_model
    from sdtrt.export.tensorrt import EngineOptions
    from sdtrt.model_repository.serving.server import TritonServer

    repo = tmp_path_factory.mktemp("trt") / "default"
    export_model(default_model, repo, max_size=256, progress=False, report=lambda *_: None, engines=EngineOptions())
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, binary=Path(TRITONSERVER),
                          log_file=repo.parent / "tritonserver.log")
    with server:
        yield server


@needs_trt
@needs_triton
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras"])
def test_served_tensorrt_matches_diffusers_fp16(trt_server, cuda_pipe, sampler):
    """The whole served path (ensemble, GPU scheduler instances, BLS to tensorrt_plan engines with their outputs
    kept on the GPU, FP16 engines) against diffusers FP16 on the same weights and seeds."""
    from sdtrt.client import Client

    result = Client(trt_server.url).txt2img(PROMPT["prompt"], negative_prompt=PROMPT["negative_prompt"],
                                            sampler=sampler, steps=20, guidance_scale=7.0, seed=42, width=128,
                                            height=128, batch_size=2)
    expected = diffusers_fp16_images(cuda_pipe(torch.float16), **PROMPT, sampler=sampler, steps=20, cfg=7.0,
                                     seed=42, width=128, height=128, batch_size=2)
    assert result.seeds == [42, 43]
    assert_fp16_close(result.images, expected)


@needs_cuda
@pytest.mark.parametrize("seed,shape", [(0, (3, 4)), (1234, (1, 4, 64, 64)), (2**32 - 1, (1, 4, 96, 64))])
def test_nv_noise_is_what_torch_randn_gives_on_this_gpu(seed, shape):
    """sdtrt.contract.philox (A1111's NV source) against torch.randn on CUDA itself, for latent shapes SD uses."""
    from sdtrt.contract.philox import nv_randn

    torch.manual_seed(seed)
    gpu = torch.randn(shape, device="cuda").cpu().numpy()
    assert np.abs(nv_randn(seed, shape) - gpu).max() < 1e-5
