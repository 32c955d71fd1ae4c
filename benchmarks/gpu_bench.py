"""sdtrt (TensorRT FP16 behind Triton) vs diffusers PyTorch FP16 on the same GPU, side by side in one run.

    python3 benchmarks/gpu_bench.py --model MODEL_DIR --repo REPO_DIR      # all (needs tritonserver + TensorRT)
    python3 benchmarks/gpu_bench.py --model MODEL_DIR --baseline-only      # diffusers alone (PyTorch, no TensorRT)

``benchmarks/gpu.sh`` is the one command that prepares the model and engines and runs this. At 512x512, batch 1,
Euler a, CFG 7 (the published anchors' setting) it measures, for each pipeline:
  * end-to-end seconds per image at 20 and 50 steps (median of --repeats, after a warm-up);
  * denoising it/s, the same way for every pipeline: 30 / (seconds at 50 steps - seconds at 20 steps), i.e.
    the cost of one more step (U-Net on 2 rows + scheduler step + for sdtrt the BLS round trip), with the
    text encoder, VAE and transfers cancelled out;
  * GPU memory: diffusers' peak allocation; for sdtrt the server's growth in nvidia-smi's used memory;
and for the served txt2img model, perf_analyzer at concurrency 1/2/4/8/16 (images/s, p50/p99 latency), with failures
from Triton's own statistics (perf_analyzer stops at a failed request; none ever counts as an image).
It writes the "gpu" section of benchmarks/RESULTS.md, naming the GPU, its driver and the software versions.
Published anchors (SD 1.5, 512x512, FP16, batch 1): TensorRT 0.75 s for 50 steps on an H100 PCIe; stable-fast
104.6 U-Net it/s on an H100; TensorRT 9 with CUDA graphs 0.819 s / 61 it/s on an A100 80G.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import median, perf_analyzer, table, timed, write_section  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, oil painting, highly detailed"
SIZE = 512
STEPS = (20, 50)
CONCURRENCY = (1, 2, 4, 8, 16)
SAMPLER = "Euler a"
GUIDANCE = 7.0
SEED = 42


def nvidia_smi(query: str) -> list[str]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True)
    return [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]


def gpu_info() -> dict[str, str]:
    name, driver, memory = nvidia_smi("name,driver_version,memory.total")
    return {"gpu": name, "driver": driver, "memory_mib": memory}


def gpu_memory_used_mib() -> int:
    return int(nvidia_smi("memory.used")[0])


def denoising_its(result: dict) -> float:
    """Steps per second of the denoising loop alone: the extra steps over the extra seconds."""
    return (STEPS[1] - STEPS[0]) / max(result[STEPS[1]] - result[STEPS[0]], 1e-9)


def bench_diffusers(model: str, repeats: int, compile_mode: str | None) -> dict:
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float16, local_files_only=True,
                                                   safety_checker=None).to("cuda")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    compile_seconds = 0.0
    if compile_mode:
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
    torch.cuda.reset_peak_memory_stats()
    result: dict = {}
    for steps in STEPS:
        def run():
            pipe(PROMPT, num_inference_steps=steps, width=SIZE, height=SIZE, guidance_scale=GUIDANCE,
                 generator=torch.Generator("cpu").manual_seed(SEED))
            torch.cuda.synchronize()

        if compile_mode and not compile_seconds:  # the first call compiles; report it, never time it
            start = time.perf_counter()
            run()
            compile_seconds = time.perf_counter() - start
        result[steps] = median(timed(run, repeats, warmup=2 if compile_mode else 1))
    result["its"] = denoising_its(result)
    result["memory_mib"] = torch.cuda.max_memory_allocated() // 2**20
    if compile_mode:
        result["compile_s"] = compile_seconds
    pipe = None  # free its GPU memory before the next pipeline loads
    torch.cuda.empty_cache()
    return result


def failed_requests(client, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    return sum(int(s.get("inference_stats", {}).get("fail", {}).get("count", 0)) for s in stats)  # JSON omits zeros


def bench_sdtrt(repo: Path, repeats: int, work: Path) -> tuple[dict, list[list[str]]]:
    import tritonclient.grpc as grpcclient

    from sdtrt.client import Client
    from sdtrt.contract.spec import TXT2IMG as PIPELINE
    from sdtrt.model_repository.serving.server import TritonServer

    binary = Path(os.environ.get("SDTRT_TRITONSERVER", "/opt/tritonserver/bin/tritonserver"))
    if not binary.is_file():
        raise SystemExit("serving TensorRT engines needs NVIDIA's tritonserver: run inside the docker/ image or set "
                         "SDTRT_TRITONSERVER (or pass --baseline-only)")
    idle = gpu_memory_used_mib()
    result: dict = {}
    rows = []
    server = TritonServer(repo, http_port=18000, grpc_port=18001, metrics_port=18002, binary=binary,
                          log_file=work / "bench-triton.log", extra_args=["--cuda-memory-pool-byte-size=0:268435456"])
    with server:
        client = Client(server.url)
        stats = grpcclient.InferenceServerClient(server.url)
        for steps in STEPS:
            result[steps] = median(timed(lambda: client.txt2img(PROMPT, steps=steps, width=SIZE, height=SIZE,
                                                                seed=SEED, sampler=SAMPLER,
                                                                guidance_scale=GUIDANCE), repeats))
        result["its"] = denoising_its(result)
        result["memory_mib"] = gpu_memory_used_mib() - idle
        for n in CONCURRENCY:
            before = failed_requests(stats, PIPELINE)
            measured = perf_analyzer(repo, server.url, n, work)
            failures = failed_requests(stats, PIPELINE) - before
            if "error" in measured:
                rows.append([str(n), "-", "-", "-", str(failures), "perf_analyzer: " + measured["error"][0][:120]])
            else:
                rows.append([str(n), f"{measured['images_s']:.2f}", f"{measured['p50_ms']:.0f}",
                             f"{measured['p99_ms']:.0f}", str(failures), ""])
    return result, rows


def versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for module in ("torch", "diffusers", "tensorrt", "tritonclient"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except (ImportError, AttributeError):
            pass
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="the diffusers folder both sides load; built (SD 1.5-shaped random weights) if missing")
    parser.add_argument("--repo", type=Path, help="the sdtrt export with TensorRT engines (sdtrt export --format trt)")
    parser.add_argument("--baseline-only", action="store_true", help="only diffusers (a machine without TensorRT)")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile mode of the compiled baseline's U-Net ('none' skips it)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=os.environ.get("SDTRT_RESULTS"),
                        help="the RESULTS.md to write the section into (default $SDTRT_RESULTS, else benchmarks/)")
    args = parser.parse_args()
    if not args.baseline_only and args.repo is None:
        parser.error("--repo is required unless --baseline-only")
    if not (args.model / "model_index.json").is_file():
        from sdtrt.pipeline.default_model import build_default_model

        print(f"building SD 1.5-shaped random weights in {args.model}", flush=True)
        build_default_model(args.model, size="sd15")

    info = gpu_info()
    started = time.strftime("%Y-%m-%d %H:%M")
    work = (args.repo or args.model).parent
    runs = {"diffusers FP16 (SDPA)": bench_diffusers(str(args.model), args.repeats, None)}
    if args.compile_mode != "none":
        runs[f"diffusers FP16 (SDPA + torch.compile {args.compile_mode})"] = bench_diffusers(
            str(args.model), args.repeats, args.compile_mode)
    perf_rows = []
    if not args.baseline_only:
        runs["sdtrt TensorRT FP16, served by Triton (gRPC)"], perf_rows = bench_sdtrt(args.repo, args.repeats, work)
    base = runs["diffusers FP16 (SDPA)"][STEPS[1]]
    rows = [[name, f"{r[STEPS[0]]:.3f}", f"{r[STEPS[1]]:.3f}", f"{r['its']:.1f}", str(r["memory_mib"]),
             f"{base / r[STEPS[1]]:.2f}x"] for name, r in runs.items()]
    compiled = [f"{name}: first call (compile) {r['compile_s']:.0f} s" for name, r in runs.items() if "compile_s" in r]
    served = (f"""
Served `txt2img` model under load (perf_analyzer, gRPC, the export's perf input: one image, 20 steps, native
size). Failures are Triton's own count of failed requests for the model during each measurement; perf_analyzer
also stops at the first failed request, which the note column then shows:

{table(["concurrency", "images/s", "p50 latency (ms)", "p99 latency (ms)", "failures (Triton)", "note"], perf_rows)}
""" if perf_rows else """
sdtrt itself was not measured in this run (`--baseline-only`: this machine has no TensorRT or tritonserver).
""")
    body = f"""## GPU: sdtrt vs diffusers on {info['gpu']}

{started}, one run of `benchmarks/gpu_bench.py` on **{info['gpu']}** ({info['memory_mib']} MiB, driver
{info['driver']}), {versions()}. Model `{args.model.name}`: 512x512, batch 1, {SAMPLER}, CFG {GUIDANCE:g},
median of {args.repeats}. Denoising it/s is 30 / (50-step seconds - 20-step seconds) for every row, so the
text encoder, VAE and transfers cancel out. Speed-up: diffusers FP16 (SDPA)'s 50-step time over each row's.

{table(["pipeline", "20 steps (s)", "50 steps (s)", "denoising it/s", "GPU memory (MiB)", "speed-up (50 steps)"],
       rows)}

{"; ".join(compiled) + "." if compiled else ""}
{served}
Published anchors (SD 1.5, 512x512, FP16, batch 1): TensorRT 0.75 s / 50 steps on an H100 PCIe; stable-fast
104.6 U-Net it/s on an H100; TensorRT 9 + CUDA graphs 0.819 s / 61 it/s on an A100 80G.
"""
    write_section("gpu", body, *([args.results] if args.results else []))
    print(body)
    print(json.dumps({"gpu": info, "runs": runs}, default=str))


if __name__ == "__main__":
    main()
