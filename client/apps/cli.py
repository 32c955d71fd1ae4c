"""The ``sdtrt`` command line: build the default model, export, serve, generate (client/apps/cli_generate.py), measure.

Heavy libraries (torch, diffusers, onnx) are imported by the commands that use them, so that the client-side
commands run on a client-only install and every command starts quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Sequence

from sdtrt import __version__
from sdtrt.client.apps.cli_generate import add_commands as add_generation_commands
from sdtrt.client.apps.cli_generate import spec_for_help
from sdtrt.contract.errors import SdtrtError, UsageError
from sdtrt.contract.files import repository_lock
from sdtrt.contract.samplers import (
    AUTOMATIC_SCHEDULES,
    CONFIG_SCHEDULES,
    SAMPLERS,
    SCHEDULE_TYPES,
    schedule_detail,
    schedule_table,
)
from sdtrt.contract.spec import (CPU_AUTO, CPU_CHOICE_FILE, CPU_FAST_ENV, CPU_PRECISIONS, DEFAULT_PORTS, ENGINES,
                                 SERVED_CPU_ENGINES, ExportLimits, load_catalog, load_spec)
from sdtrt.model_repository.configs import NETWORK_BACKENDS, ServingOptions

HEALTH_PORT = 8003  # `sdtrt serve`'s own /livez and /readyz (sdtrt.model_repository.serving.health.HealthEndpoint)

EPILOG_MAIN = """\
typical session:
  sdtrt init-default --out models/default          # build the small offline demo model
  sdtrt export models/default --out repos/default  # ONNX + spec + Triton model repository
  sdtrt serve -m repos/default                     # tritonserver; Ctrl-C stops it
  sdtrt txt2img "a large red circle in the center on a blue background" --seed 42 --out outputs/
                                                   # (in another shell)
"""


def add_serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler-instances", type=int, default=ServingOptions.scheduler_instances,
                   help="denoising loops run at once; their U-Net steps are batched together")
    p.add_argument("--max-queue", type=int, default=ServingOptions.max_queue,
                   help="requests waiting for a loop, per job; more are refused as busy (UNAVAILABLE, HTTP 503); "
                        "0: no limit")
    p.add_argument("--unet-queue-delay-us", type=int, default=ServingOptions.unet_queue_delay_us, metavar="US",
                   help="how long the U-Net's batcher waits for other requests' steps (default 0: never for a lone "
                        "request; steps queued while the U-Net runs are merged anyway)")


    p.add_argument("--cpu-engine", choices=SERVED_CPU_ENGINES, default=CPU_AUTO,
                   help="with --backend python: what runs the networks on the CPU; auto: the faster of onnxruntime "
                   "and OpenVINO fp32 on this machine, measured per network at its first start (the pictures are "
                   "the same); `sdtrt serve --fast` lets it take bf16 too")
    p.add_argument("--loop-networks", choices=["bls", "in-process"], default="bls",
                   help="with --backend python: where the loops' per-step networks (U-Net, ControlNets) run: bls "
                   "(their Triton models) or in-process (the job model's own process: no round trip per step; each "
                   "job instance holds its own copy of them)")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS, default=ServingOptions.cpu_precision,
                   help="with --cpu-engine openvino or auto: bf16 is ~2x faster where the CPU has bfloat16 "
                        "(AVX512-BF16, AMX), with pictures a little off fp32's, as FP16 engines are on a GPU")


def serving_options(args: argparse.Namespace) -> dict:
    return {"scheduler_instances": args.scheduler_instances, "max_queue": args.max_queue,
            "unet_queue_delay_us": args.unet_queue_delay_us, "cpu_engine": args.cpu_engine,
            "cpu_precision": args.cpu_precision, "gpu": _onnxruntime_gpu(args),
            "loop_networks": args.loop_networks.replace("-", "_")}


def build_parser(spec=None) -> argparse.ArgumentParser:
    """The whole command line; ``spec`` (a model's) documents the generation flags' ranges and defaults."""
    parser = argparse.ArgumentParser(
        prog="sdtrt",
        description="Stable Diffusion through ONNX/TensorRT and Triton Inference Server.",
        epilog=EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdtrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_init_default, _add_export, _add_build_engines, _add_refit, _add_configs):
        add(sub)
    add_generation_commands(sub, spec)
    for add in (_add_serve, _add_models, _add_soak, _add_perf_analyzer, _add_samplers):
        add(sub)
    return parser


def _add_init_default(sub) -> None:
    p = sub.add_parser("init-default", help="build the small offline default model (a diffusers folder)",
                       description="Build the embedded default model, a small Stable-Diffusion-shaped pipeline with "
                       "CLIP's real tokenizer, byte-identical on every build. By default the trained 'shapes' model "
                       "(coloured shapes on coloured backgrounds at 64x64, drawn where the prompt says: "
                       "'a large red circle in the center on a blue background'); --size tiny gives random weights.")
    p.add_argument("--out", type=Path, default=Path("models/default"), help="output folder (default: models/default)")
    p.add_argument("--clip-bpe", type=Path, default=None,
                   help="CLIP's bpe_simple_vocab_16e6.txt.gz, or the open-clip-torch wheel holding it "
                   "(default: the copy the install step fetched)")
    p.add_argument("--inpainting", action="store_true",
                   help="give the U-Net 9 input channels, like SD inpainting checkpoints (random weights)")
    p.add_argument("--family", choices=["sd1", "sd2"], default="sd1",
                   help="sd2: the tiny model in SD 2.x's architecture (OpenCLIP-style text, v-prediction)")
    p.add_argument("--size", choices=["shapes", "tiny", "sd15"], default=None,
                   help="shapes (the default for SD 1.x): trained, draws what the prompt says; tiny (the default "
                   "with --inpainting or --family sd2): random weights, seconds on a CPU; sd15: SD 1.5's real "
                   "shapes, random weights, for GPU benchmarks without a checkpoint (~4 GB)")
    p.add_argument("--controlnets", type=Path, default=None, metavar="DIR",
                   help="also write the shapes model's trained canny ControlNet (shapes_canny.safetensors) into DIR, "
                   "for `sdtrt export ... --controlnets DIR`")
    p.set_defaults(func=cmd_init_default)


def _backend_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--backend", choices=[b for b in NETWORK_BACKENDS if b != "tensorrt"], default="python", help=help)
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="with --backend onnxruntime: where Triton runs the networks (auto: the GPUs when this machine "
                   "has one, as torch sees it; the python backend always runs them on the CPU)")


def _onnxruntime_gpu(args: argparse.Namespace) -> bool:
    """Whether Triton's onnxruntime backend runs the networks on the GPUs (--device)."""
    backend, device = getattr(args, "backend", "python"), getattr(args, "device", "auto")
    if backend != "onnxruntime":
        if device == "gpu":
            raise UsageError("--device gpu runs Triton's onnxruntime backend on the GPUs: it needs --backend "
                             "onnxruntime (TensorRT engines: sdtrt build-engines)")
        return False
    if device != "auto":
        return device == "gpu"
    # loaded when asked: the server install's torch (a CPU build answers False)
    import torch

    return bool(torch.cuda.is_available())


def _registered_folder_flags(p: argparse.ArgumentParser) -> None:
    """The export's folders of models that requests pick by name, and the variants they run."""
    p.add_argument("--vaes", type=Path, default=None, metavar="DIR",
                   help="register every VAE in DIR (A1111's models/VAE: .safetensors, or .pt/.ckpt weights-only) for "
                   "requests to pick by file name (A1111's 'SD VAE'); each adds its encoder and decoder")
    p.add_argument("--upscalers", type=Path, default=None, metavar="DIR",
                   help="register every upscaler model in DIR (A1111's models/ESRGAN: ESRGAN, Real-ESRGAN incl. "
                   "compact, HAT; .safetensors, or .pth weights-only) under its file stem, for the hires fix's "
                   "hr_upscaler and Extras")
    p.add_argument("--face-restorers", type=Path, default=None, metavar="DIR",
                   help="register the face restorers in DIR (A1111's models/GFPGAN and models/Codeformer: a GFPGAN "
                   "and/or a CodeFormer file, with facexlib's detection_Resnet50_Final and parsing_parsenet beside "
                   "them), for restore_faces and Extras")
    p.add_argument("--controlnets", type=Path, default=None, metavar="DIR",
                   help="register the ControlNets in DIR (A1111's single files such as control_v11p_sd15_canny.pth, "
                        "diffusers folders), each selected by a request's ControlNet unit under its file name; the "
                        "U-Net then takes their residuals")
    p.add_argument("--interrogators", type=Path, default=None, metavar="DIR",
                   help="register the interrogators in DIR, for /sdapi/v1/interrogate and Loopback: DeepBooru "
                   "(A1111's model-resnet_custom_v3.pt, read weights-only) and/or the CLIP interrogator (BLIP's "
                   "model_base_caption_capfilt_large.pth with bert-base-uncased's vocab.txt, openai's ViT-L-14.pt "
                   "(TorchScript: needs --allow-pickle), and A1111's category lists in DIR/interrogate/*.txt)")
    p.add_argument("--tiling", action="store_true",
                   help="also export the U-Net and VAE with circular padding, for requests with tiling (A1111's "
                   "seamless 'Tiling'); adds their size to the export")
    p.add_argument("--hypertile", action="store_true",
                   help="also export the U-Net and VAE decoder whose attention layers take A1111's Hypertile tiles, "
                   "for requests with hypertile_enable_unet / hypertile_enable_vae (onnxruntime only); adds their size")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX and write the model spec",
                       description="Export the text encoder, U-Net and VAE encoder and decoder of a Stable Diffusion "
                       "checkpoint to ONNX (opset 17, dynamic batch, latent height/width and text length), check each "
                       "with onnx.checker and against torch in onnxruntime, and write sdtrt_spec.json and the Triton "
                       "model repository.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="a diffusers folder, or a single-file .safetensors checkpoint (SD 1.x "
                   "or 2.x; its architecture is read from its weights)")
    p.add_argument("--out", type=Path, required=True, metavar="REPO_DIR",
                   help="the model repository to add the model to (created if need be)")
    p.add_argument("--name", default=None, help="the model's name in the repository (default: the file's stem or "
                   "the folder's name); a model of the same name is replaced")
    p.add_argument("--default", action="store_true",
                   help="make it the repository's default model (the first one exported is)")
    p.add_argument("--config", type=Path, default=None,
                   help="for a single-file checkpoint: a local diffusers folder of its architecture, instead of "
                   "reading it from the weights")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="override what the model predicts (default: its family's; SD 2.x weights are tested as "
                   "A1111 does, v-prediction for the 768-v models)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="unpickle a .ckpt/.pt that holds more than tensors (unpickling can run code; plain ones load "
                        "weights-only without this): only for files you trust")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="fuse a LoRA into the exported weights at SCALE (default 1); repeatable")
    p.add_argument("--loras", type=Path, default=None, metavar="DIR",
                   help="register every LoRA in DIR (.safetensors, kohya/A1111 or diffusers; named by file stem) for "
                   "requests to use with <lora:name:weight> in their prompts")
    p.add_argument("--embeddings", type=Path, default=None, metavar="DIR",
                   help="register every textual-inversion embedding in DIR; a prompt uses one by writing its name")
    p.add_argument("--vae", type=Path, default=None, metavar="FILE",
                   help="a VAE .safetensors to use in place of the checkpoint's (e.g. vae-ft-mse-840000-ema-pruned); "
                   "the infotext names it as A1111 does")
    _registered_folder_flags(p)
    limits = p.add_argument_group("what a request may ask for (recorded in the spec)")
    limits.add_argument("--max-batch", type=int, default=ExportLimits.max_batch, help="most images per request")
    limits.add_argument("--min-size", type=int, default=ExportLimits.min_size, help="smallest width/height in pixels")
    limits.add_argument("--max-size", type=int, default=None,
                        help=f"largest width/height in pixels (default: {ExportLimits.max_size}, or 1.5x the model's "
                        "native size where that is more: 1536 for SDXL)")
    limits.add_argument("--max-chunks", type=int, default=ExportLimits.max_chunks,
                        help="longest prompt, in 75-token chunks")
    limits.add_argument("--max-lora-rank", type=int, default=ExportLimits.max_lora_rank, metavar="N",
                        help="summed rank of the LoRAs one request may use (with --loras)")
    limits.add_argument("--max-pixel-steps", type=int, default=None, metavar="N",
                        help="most width x height x images x steps per request, hires pass included; 0: no ceiling "
                             f"(default: max-size^2 x max-batch x {ExportLimits.full_batch_steps})")
    limits.add_argument("--max-prompt-chars", type=int, default=None, metavar="N",
                        help=f"longest prompt in characters (default: max-chunks x 75 x {ExportLimits.chars_per_token})")
    _backend_flag(p, "how Triton runs the networks: python = onnxruntime in the Python backend (any tritonserver, "
                     "incl. the pip one); onnxruntime = Triton's ONNX Runtime backend (TensorRT: --format trt)")
    add_serving_args(p)
    p.add_argument("--format", choices=["onnx", "trt"], default="onnx",
                   help="trt: also build FP16 TensorRT engines (NVIDIA GPU + `pip install 'sdtrt[gpu]'`) and serve "
                   "the networks with them")
    _engine_flags(p)
    p.set_defaults(func=cmd_export)


def _add_build_engines(sub) -> None:
    p = sub.add_parser("build-engines", help="build TensorRT engines for an existing export (GPU only)",
                       description="Build FP16 TensorRT engines from one model's ONNX files in REPO_DIR and switch the "
                       "Triton configs to tensorrt_plan. Engines are named after the GPU, TensorRT version and "
                       "profile; existing ones are reused.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("repo", type=Path, metavar="REPO_DIR")
    p.add_argument("--model", default=None, help="which model (default: the repository's default)")
    add_serving_args(p)
    _engine_flags(p)
    p.set_defaults(func=cmd_build_engines)


def _add_refit(sub) -> None:
    p = sub.add_parser("refit", help="swap new weights (e.g. with a LoRA fused) into refittable engines (GPU only)",
                       description="Re-export MODEL (plus any --lora) and refit REPO_DIR's TensorRT engines with its "
                       "weights, without rebuilding; the engines must have been built with --refittable and MODEL "
                       "must have the same architecture.")
    p.add_argument("repo", type=Path, metavar="REPO_DIR")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--name", default=None, help="which of the repository's models to refit (default: its default)")
    p.add_argument("--config", type=Path, default=None, help="for a single-file checkpoint: its diffusers config folder")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="fuse a LoRA first; repeatable")
    p.add_argument("--url", default=None, help="a running `sdtrt serve` (gRPC) on REPO_DIR: reload the model there "
                   "through model control once the new engines are written, then remove the old ones")
    _control_key_flag(p, "the server's control key (with --url)")
    p.set_defaults(func=cmd_refit)


def _add_configs(sub) -> None:
    p = sub.add_parser("configs", help="regenerate an export's Triton configs for another network backend",
                       description="Rewrite every config.pbtxt of REPO_DIR from its spec, e.g. to serve the ONNX "
                       "networks with Triton's own onnxruntime backend on NVIDIA's server image.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("repo", type=Path, metavar="REPO_DIR")
    _backend_flag(p, "how Triton runs the networks (tensorrt: use build-engines)")
    add_serving_args(p)
    p.set_defaults(func=cmd_configs)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run tritonserver on an exported model repository",
                       description="Start tritonserver on REPO_DIR, wait until every model is ready, and serve until "
                       "Ctrl-C or SIGTERM (then stop it cleanly, stubs included). A model whose Python stub dies is "
                       "reloaded (readiness is false meanwhile), a server that exits is restarted; each event is a "
                       "JSON log line. Arguments after `--` go to tritonserver as they are, e.g. "
                       "`sdtrt serve -m repos/default -- --log-verbose=1`.")
    p.add_argument("-m", "--model-repository", type=Path, required=True, metavar="REPO_DIR",
                   help="an `sdtrt export` output folder")
    for kind in ("http", "grpc", "metrics"):
        p.add_argument(f"--{kind}-port", type=int, default=DEFAULT_PORTS[kind], help="(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("--log-file", type=Path, default=None,
                   help="server log (default: REPO_DIR/../tritonserver-PORT.log; '-': this process's stdout)")
    p.add_argument("--tritonserver", type=Path, default=None,
                   help="a tritonserver binary (default: $SDTRT_TRITONSERVER, else the one in the nvidia-pytriton wheel)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the models to load (default: %(default)s)")
    p.add_argument("--fast", action="store_true",
                   help="CPU: let networks exported with --cpu-engine auto (the default) run in bf16 where this CPU "
                   "has it natively (AVX512-BF16, AMX) and it is faster: ~2x, pictures a little off fp32's (PSNR in "
                   "benchmarks/RESULTS.md); the engines each network runs are printed once the server is ready")
    _control_key_flag(p, "the secret Triton's model-control, shared-memory, logging and trace APIs want (created with "
                         "a random key if missing; default: $SDTRT_CONTROL_KEY, else $SDTRT_CONTROL_KEY_FILE, else "
                         "the file control-key in sdtrt's cache folder). Inference, health and metadata stay open")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish before the server stops "
                   "(tritonserver's --exit-timeout-secs; set it above your longest request; default: %(default)s)")
    watchdog = p.add_argument_group("the watchdog (a model that stops answering is killed and reloaded)")
    watchdog.add_argument("--probe-interval", type=float, default=5.0, metavar="SECONDS",
                          help="how often each model gets a tiny probe request; 0: no probes (default: %(default)s)")
    watchdog.add_argument("--probe-timeout", type=float, default=20.0, metavar="SECONDS",
                          help="a model that has not answered its probe in this long, with no call completed "
                          "meanwhile, is hung; set it above your longest single network call (default: %(default)s)")
    watchdog.add_argument("--health-port", type=int, default=HEALTH_PORT,
                          help="sdtrt serve's own /livez and /readyz for Kubernetes' probes, on --host; 0: none "
                          "(default: %(default)s)")
    p.set_defaults(func=cmd_serve, triton_args=[])


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list a server's (or repository's) models; load or unload one",
                       description="`sdtrt models --url URL` lists the models a server has, with their A1111 name and "
                       "hash, family and whether they are loaded; `load NAME` and `unload NAME` load and unload one "
                       "through Triton's model control API, without restarting the server (the jobs stay; a "
                       "request for an unloaded model is refused naming it). --repo lists an export's models.")
    p.add_argument("action", nargs="?", choices=["list", "load", "unload"], default="list")
    p.add_argument("name", nargs="?", help="the model to load or unload")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="a running `sdtrt serve`, gRPC (default: localhost:8001)")
    where.add_argument("--repo", type=Path, metavar="REPO_DIR", help="an export to list, without a server")
    _control_key_flag(p, "load and unload: the server's control key (default: found as `sdtrt serve` finds it)")
    p.set_defaults(func=cmd_models)


def _control_key_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--control-key-file", type=Path, default=None, metavar="FILE", help=help)


def _add_soak(sub) -> None:
    p = sub.add_parser("soak", help="a bounded mixed load for N minutes: requests, errors, latency, server memory",
                       description="Run a mixed load (txt2img with several samplers and sizes, hires fix, img2img, "
                       "inpainting, refused and cancelled requests) from several clients for N minutes and report "
                       "requests and errors by kind, p50/p99 latency and the resident memory of tritonserver and "
                       "every Python stub at the start and the end. The server must run on this machine.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-m", "--model-repository", type=Path, metavar="REPO_DIR",
                       help="start tritonserver on this export (free ports) for the soak, and stop it after")
    where.add_argument("--url", help="a running server's gRPC address (give --server-pid: its tritonserver process)")
    p.add_argument("--server-pid", type=int, help="with --url: the tritonserver process id, for its memory")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    p.set_defaults(func=cmd_soak)


def _add_perf_analyzer(sub) -> None:
    p = sub.add_parser("perf-analyzer", add_help=False,
                       help="run Triton's perf_analyzer (from the tritonclient wheel) with the libraries it needs",
                       description="All arguments go to perf_analyzer. Each exported model has an input file: "
                       "sdtrt perf-analyzer -m txt2img --input-data REPO_DIR/txt2img/perf_input.json "
                       "-u localhost:8001 -i grpc --concurrency-range 1:4")
    p.add_argument("perf_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_perf_analyzer)


def _add_samplers(sub) -> None:
    p = sub.add_parser("samplers", help="list the sampler names, the diffusers scheduler behind each and its schedules",
                       description="The A1111 sampler names and schedule types sdtrt knows. Which schedule types each "
                       "sampler accepts is in a model's spec: given --url or --repo it is read from there, else "
                       "worked out from diffusers (a full install).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server (gRPC) whose spec to read")
    where.add_argument("--repo", type=Path, metavar="REPO_DIR", help="an export whose spec to read")
    p.set_defaults(func=cmd_samplers)


def cmd_init_default(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.pipeline.default_model import build_default_model, write_default_controlnet

    size = args.size or ("tiny" if args.inpainting or args.family != "sd1" else "shapes")
    if size == "shapes" and (args.inpainting or args.family != "sd1"):
        raise UsageError("--size shapes is trained as an SD 1.x text-to-image model: it has no --inpainting or "
                         "--family sd2 variant; use --size tiny for those")
    if args.controlnets and size != "shapes":
        raise UsageError("--controlnets: the trained ControlNet belongs to the shapes model (--size shapes)")
    path = build_default_model(args.out, args.clip_bpe, inpainting=args.inpainting, size=size, family=args.family)
    print(f"default model written to {path}")
    if args.controlnets:
        print(f"its canny ControlNet written to {write_default_controlnet(args.controlnets)}")
    return 0


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT engines (--format trt, build-engines)")
    g.add_argument("--static-size", default=None, metavar="WxH",
                   help="build for this one resolution only (faster); default: the export's whole size range")
    g.add_argument("--static-batch", type=int, default=None, metavar="N", help="build for N images per request only")
    g.add_argument("--refittable", action="store_true", help="allow swapping weights (e.g. a fused LoRA) without a rebuild")
    g.add_argument("--fp32", action="append", default=[], metavar="NETWORK",
                   help="keep this network in FP32 (repeatable), e.g. vae_decoder for VAEs that overflow in FP16")
    g.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0-5",
                   help="TensorRT builder optimisation level")


def _engine_options(args: argparse.Namespace):
    # loaded when the command runs (see the module docstring)
    from sdtrt.export.tensorrt import EngineOptions

    size = None
    if args.static_size:
        try:
            w, h = (int(v) for v in args.static_size.lower().split("x"))
        except ValueError:
            raise UsageError(f"--static-size must look like 512x512, got {args.static_size!r}") from None
        size = (w, h)
    return EngineOptions(static_size=size, static_batch=args.static_batch, refittable=args.refittable,
                         fp32=tuple(args.fp32), optimization_level=args.opt_level)


def cmd_build_engines(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.export import build_engines_and_configs

    build_engines_and_configs(args.repo, _engine_options(args), ServingOptions(**serving_options(args)), args.model)
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.export import refit_repository

    before = load_catalog(args.repo).get(args.name)
    spec = refit_repository(args.repo, args.model, name=args.name, config=args.config, loras=tuple(args.lora))
    print(f"refitted {args.repo} with {spec.model_name} [{spec.model_hash}]: new engine files "
          f"{', '.join(entry['file'] for entry in spec.extra[ENGINES].values())}")
    old = [args.repo / spec.triton_name(part) / "1" / entry["file"]
           for part, entry in before.extra.get(ENGINES, {}).items()
           if entry["file"] != spec.extra[ENGINES][part]["file"]]
    if args.url is None:
        print("a server on this repository keeps the old engines until its models are loaded again: "
              f"`sdtrt models load {spec.key} --url URL` (the old files stay until then)")
        return 0
    # loaded when the command runs (see the module docstring)
    from sdtrt.client.apps.models import ModelControl

    seconds = ModelControl(args.url, args.control_key_file).load(spec.key)
    for path in old:  # the server now holds the new engines
        path.unlink(missing_ok=True)
    print(f"{args.url}: {spec.key} reloaded with the new engines in {seconds:.1f} s")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.model_repository.build import write_repository

    # it removes the models the catalog lacks: an export joining the repository meanwhile would lose its own
    with repository_lock(args.repo):
        written = write_repository(args.repo, None, ServingOptions(
            backend=args.backend, **serving_options(args)))
    print(f"wrote {sum(p.name == 'config.pbtxt' for p in written)} configs under {args.repo} ({args.backend} backend)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.export import export_model
    from sdtrt.export.options import ExportOptions

    options = ExportOptions(
        name=args.name, default=args.default, config=args.config, loras=tuple(args.lora), lora_dir=args.loras,
        embedding_dir=args.embeddings, max_lora_rank=args.max_lora_rank, vae=args.vae, vae_dir=args.vaes,
        upscaler_dir=args.upscalers, face_restorer_dir=args.face_restorers, tiling=args.tiling,
        interrogator_dir=args.interrogators,
        controlnet_dir=args.controlnets,
        hypertile=args.hypertile,
        allow_pickle=args.allow_pickle,
        prediction_type=args.prediction_type, max_batch=args.max_batch, min_size=args.min_size,
        max_size=args.max_size, max_chunks=args.max_chunks, max_pixel_steps=args.max_pixel_steps,
        max_prompt_chars=args.max_prompt_chars, serving=ServingOptions(backend=args.backend, **serving_options(args)),
        engines=_engine_options(args) if args.format == "trt" else None)
    spec = export_model(args.model, args.out, options)
    print(f"exported {spec.source} to {args.out} as {spec.title}")
    return 0


def cpu_engine_report(repo: Path) -> list[str]:
    """What each network exported with ``--cpu-engine auto`` runs on, as its first start measured it."""
    lines = []
    for record in sorted(Path(repo).glob(f"*/*/{CPU_CHOICE_FILE}")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            if f'string_value: "{CPU_AUTO}"' not in (record.parent.parent / "config.pbtxt").read_text():
                continue  # (a choice left from before `sdtrt configs` named an engine)
            choice = json.loads(record.read_text())["choice"]
            timings = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in choice["seconds"].items())
            lines.append(f"cpu engine: {record.parent.parent.name} runs {choice['engine']} {choice['precision']} "
                         f"(measured here: {timings})")
    return lines


def cmd_serve(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.model_repository.serving.control import resolve_key
    from sdtrt.model_repository.serving.health import Healer, HealthEndpoint
    from sdtrt.model_repository.serving.server import TritonServer

    server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host, log_file=args.log_file,
                          binary=args.tritonserver, extra_args=list(args.triton_args),
                          drain_timeout=args.drain_timeout,
                          control_key=resolve_key(args.control_key_file, create=True))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # loaded when the command runs (see the module docstring)
    from sdtrt.client.apps.cli_generate import is_loopback

    if not is_loopback(args.host):
        print(f"warning: Triton's inference API has no authentication and now listens on {args.host}: let only the "
              "gateway, the page and Prometheus reach its ports (a firewall, a NetworkPolicy); see SECURITY.md",
              file=sys.stderr, flush=True)
    # loaded when the command runs (see the module docstring)
    from sdtrt.model_repository.build import refresh_entry_points

    for entry in refresh_entry_points(args.model_repository):
        print(f"updated {entry} to this sdtrt's module layout", flush=True)
    print(f"starting tritonserver on {args.model_repository} (log: {server.log_file or 'next to the repository'})",
          flush=True)
    healer = Healer(server, load_timeout=args.timeout, probe_interval=args.probe_interval,
                    probe_timeout=args.probe_timeout)
    # bound before tritonserver starts: a taken port fails the command at once, not after the models load
    health = HealthEndpoint(healer, args.host, args.health_port) if args.health_port else None
    if args.fast:  # the stubs inherit this environment (read by the networks' `auto` choice)
        os.environ[CPU_FAST_ENV] = "1"
    server.start(timeout=args.timeout)
    for line in cpu_engine_report(args.model_repository):
        print(line, flush=True)
    healer.start()
    if health is not None:
        health.start()
    print(f"ready: grpc {server.url}  http {server.http_url}  metrics {args.host}:{args.metrics_port}/metrics\n"
          f"try:   sdtrt txt2img \"a red fox in snow\" --url {server.url}\n"
          f"model control (load, unload, shared memory, logging, trace) wants the key in {server.control_key.source}\n"
          "Ctrl-C stops the server.", flush=True)
    try:
        while not stop.wait(0.5):
            if healer.failed.is_set():
                print(f"tritonserver could not be brought back:\n{server.log_tail()}", file=sys.stderr)
                return 1
    finally:
        healer.stop()
        if health is not None:
            health.stop()
        if stop.is_set():  # a shutdown (a scale-in, a rolling update): let the generations under way finish
            busy = server.requests_in_flight()
            if busy:
                print(f"draining: {busy:g} generations in flight; waiting up to {args.drain_timeout:g} s", flush=True)
                left = server.drain()
                print("drained" if not left else f"drain timeout: {left:g} generations still in flight", flush=True)
        code = server.stop()
    print(f"tritonserver stopped (exit code {code})", flush=True)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.client.apps.models import ModelControl

    if args.repo is not None:
        if args.action != "list":
            raise UsageError("load and unload need a running server (--url), not --repo")
        catalog = load_catalog(args.repo)
        for name, spec in catalog.models.items():
            print(_model_line(name, spec, catalog.default, None))
        return 0
    control = ModelControl(args.url or f"localhost:{DEFAULT_PORTS['grpc']}", args.control_key_file)
    if args.action == "list":
        catalog = control.catalog()
        for name, spec in catalog.models.items():
            print(_model_line(name, spec, catalog.default, control.is_loaded(spec)))
        return 0
    if not args.name:
        raise UsageError(f"`sdtrt models {args.action}` needs the model's name (`sdtrt models --url URL` lists them)")
    seconds = control.load(args.name) if args.action == "load" else control.unload(args.name)
    print(f"{args.action}ed {args.name} in {seconds:.1f} s")
    return 0


def _model_line(name: str, spec, default: str, loaded: bool | None) -> str:
    state = "" if loaded is None else ("  loaded" if loaded else "  unloaded")
    mark = " (default)" if name == default else ""
    vae = f", VAE {spec.extra['vae']['name']}" if spec.extra.get("vae") else ""
    return (f"{name}{mark}: Model {spec.model_name} [{spec.model_hash}], {spec.prediction_type}, "
            f"{spec.field('width').default}px native{vae}{state}")


def cmd_soak(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.client import Client
    from sdtrt.client.apps.soak import soak
    from sdtrt.model_repository.serving.server import TritonServer

    server = None
    if args.model_repository is not None:
        ports = []
        for _ in range(3):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        server = TritonServer(args.model_repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
        print(f"starting tritonserver on {args.model_repository} for the soak", flush=True)
        server.start()
        url, pid = server.url, server.process.pid
    else:
        if args.server_pid is None:
            raise UsageError("--url needs --server-pid (the tritonserver process on this machine, for its memory)")
        url, pid = args.url, args.server_pid
    try:
        print(f"soaking {url} for {args.minutes:g} min with {args.concurrency} clients", flush=True)
        result = soak(Client(url), pid, args.minutes, args.concurrency)
    finally:
        if server is not None:
            server.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["errors"] == 0 else 1


def cmd_perf_analyzer(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.model_repository.serving.server import perf_analyzer_command

    command, env = perf_analyzer_command(args.perf_args)
    os.execvpe(command[0], command, env)
    return 1  # not reached


def cmd_samplers(args: argparse.Namespace) -> int:
    if args.url:
        # loaded when the command runs (see the module docstring)
        from sdtrt.client import Client

        schedules = Client(args.url).spec.schedules
    elif args.repo:
        schedules = load_spec(args.repo).schedules
    else:
        schedules = schedule_table()
    width = max(len(n) for n in SAMPLERS)
    DEFAULT = "Automatic"
    for s in SAMPLERS.values():
        automatic = AUTOMATIC_SCHEDULES.get(s.name, DEFAULT) if s.schedule == DEFAULT else s.schedule
        config = {**s.overrides, **CONFIG_SCHEDULES.get(automatic, {})}
        extra = " ".join(f"{k}={v}" for k, v in config.items())
        note = f"  (Automatic: {automatic})" if s.name in AUTOMATIC_SCHEDULES else ""
        library = "A1111's own, on k-diffusion:" if s.k_options.get("own_function") else "k-diffusion"
        k = f"  | {library} {s.k_function}" if s.k_function else ""
        k += f"  | A1111's own timesteps: {s.t_function}" if s.t_function else ""
        only = "(k-diffusion only)" if s.k_function else "(A1111's own only)"
        diffusers = f"{s.scheduler} {extra}".rstrip() if s.scheduler else only
        print(f"{s.name:<{width}}  {diffusers}{note}{k}")
    print("\nA k-diffusion sampler runs on k-diffusion (as A1111) with --k-diffusion, with a schedule type its "
          "diffusers class cannot follow, or with an A1111 setting only k-diffusion takes (--eta, --s-churn, ...); "
          "DDIM and PLMS run A1111's own timestep functions with --k-diffusion on the Automatic schedule.")
    print("\nschedule types (--schedule-type; 'Automatic': A1111's choice for the sampler, else its own):")
    for name in SCHEDULE_TYPES:
        usable = [s for s, sampler in SAMPLERS.items() if sampler.k_function or name in schedules.get(s, ())]
        which = f"{len(usable)} of {len(SAMPLERS)} samplers" if len(usable) > 2 else " and ".join(usable) or "none"
        print(f"  {name:<16} {schedule_detail(name)}; with {which}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sdtrt never downloads weights
    # Third-party chatter (transformers' notes about torchvision, progress bars of loading and saving weights) is not
    # sdtrt's output; sdtrt shows its own progress.
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["perf-analyzer"] and argv[1:2] not in (["-h"], ["--help"]):  # every argument is perf_analyzer's
        return cmd_perf_analyzer(argparse.Namespace(perf_args=argv[1:]))
    passthrough: list[str] = []
    if "--" in argv:  # `sdtrt serve ... -- <tritonserver flags>`
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = build_parser(spec_for_help(argv)).parse_args(argv)
    if passthrough:
        if args.command != "serve":
            build_parser().error("arguments after `--` are only for `sdtrt serve` (they go to tritonserver)")
        args.triton_args = passthrough
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SdtrtError as exc:
        print(f"sdtrt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
