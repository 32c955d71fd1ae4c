"""sdtrt (TensorRT FP16 behind Triton) vs diffusers PyTorch FP16 on the same GPU, side by side in one run.

    python benchmarks/gpu_bench.py --model MODEL_DIR --repo REPO_DIR      # both (needs tritonserver + TensorRT)
    python benchmarks/gpu_bench.py --model MODEL_DIR --baseline-only      # diffusers alone (PyTorch, no TensorRT)

Measures at 512x512, batch 1 (the published anchors' setting), 20 and 50 steps:
  * diffusers StableDiffusionPipeline FP16 with SDPA attention, and with torch.compile'd U-Net
  * sdtrt served: end-to-end latency through the txt2img ensemble, U-Net iterations/s (Triton's own compute
    statistics for the unet model), images/s with 1, 4 and 16 concurrent clients, GPU memory in use
and writes the "gpu" section of benchmarks/RESULTS.md, naming the GPU. Published anchors (SD 1.5, 512x512,
FP16, batch 1): TensorRT 0.75 s for 50 steps on an H100 PCIe; stable-fast 104.6 U-Net it/s on an H100;
TensorRT 9 with CUDA graphs 0.819 s / 61 it/s on an A100 80G.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import median, table, timed, write_section  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn, oil painting, highly detailed"
SIZE = 512
STEPS = (20, 50)
CONCURRENCY = (1, 4, 16)


def gpu_name() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown GPU"


def gpu_memory_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[0])


def bench_diffusers(model: str, repeats: int, compile_unet: bool) -> dict:
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float16, local_files_only=True,
                                                   safety_checker=None).to("cuda")
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
    torch.cuda.reset_peak_memory_stats()
    result = {}
    for steps in STEPS:
        def run():
            pipe(PROMPT, num_inference_steps=steps, width=SIZE, height=SIZE, guidance_scale=7.0,
                 generator=torch.Generator("cuda").manual_seed(42))
            torch.cuda.synchronize()

        result[steps] = median(timed(run, repeats, warmup=2 if compile_unet else 1))
    # U-Net it/s: the loop's share of a run, from the difference between the two step counts.
    result["unet_its"] = (STEPS[1] - STEPS[0]) / max(result[STEPS[1]] - result[STEPS[0]], 1e-9)
    result["memory_mib"] = torch.cuda.max_memory_allocated() // 2**20
    del pipe
    torch.cuda.empty_cache()
    return result


def bench_sdtrt(repo: Path, repeats: int) -> dict:
    import tritonclient.grpc as grpcclient

    from sdtrt.client import Client
    from sdtrt.model_repository.server import TritonServer

    if not os.environ.get("SDTRT_TRITONSERVER") and not Path("/opt/tritonserver/bin/tritonserver").exists():
        raise SystemExit("serving TensorRT engines needs NVIDIA's tritonserver: run inside the docker/ image or set "
                         "SDTRT_TRITONSERVER")
    binary = Path(os.environ.get("SDTRT_TRITONSERVER", "/opt/tritonserver/bin/tritonserver"))
    idle = gpu_memory_used_mib()
    result: dict = {}
    with TritonServer(repo, http_port=18000, grpc_port=18001, metrics_port=18002, binary=binary,
                      log_file=repo.parent / "bench-triton.log") as server:
        client = Client(server.url)
        for steps in STEPS:
            result[steps] = median(timed(lambda: client.txt2img(PROMPT, steps=steps, width=SIZE, height=SIZE,
                                                                seed=42, sampler="Euler a"), repeats))
        stats = grpcclient.InferenceServerClient(server.url).get_inference_statistics("unet", as_json=True)
        unet = stats["model_stats"][0]
        executions = int(unet["execution_count"])
        compute_ns = sum(int(unet["inference_stats"][k]["ns"]) for k in ("compute_input", "compute_infer",
                                                                           "compute_output"))
        result["unet_its"] = executions / (compute_ns / 1e9)
        for n in CONCURRENCY:
            def burst():
                threads = [threading.Thread(target=lambda s=s: client.txt2img(
                    PROMPT, steps=STEPS[0], width=SIZE, height=SIZE, seed=s)) for s in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

            seconds = median(timed(burst, max(1, repeats // 2)))
            result[f"c{n}"] = n / seconds
        result["memory_mib"] = gpu_memory_used_mib() - idle
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the diffusers folder both sides load (sdtrt exported it)")
    parser.add_argument("--repo", type=Path, help="the sdtrt export with TensorRT engines (sdtrt export --format trt)")
    parser.add_argument("--baseline-only", action="store_true", help="only diffusers (a machine without TensorRT)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.baseline_only and args.repo is None:
        parser.error("--repo is required unless --baseline-only")

    gpu = gpu_name()
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    sdpa = bench_diffusers(args.model, args.repeats, compile_unet=False)
    runs = {"diffusers FP16 (SDPA)": sdpa}
    if not args.no_compile:
        runs["diffusers FP16 (SDPA + torch.compile)"] = bench_diffusers(args.model, args.repeats, compile_unet=True)
    if not args.baseline_only:
        runs["sdtrt TensorRT FP16, served by Triton"] = bench_sdtrt(args.repo, args.repeats)
    for name, r in runs.items():
        rows.append([name, f"{r[20]:.3f}", f"{r[50]:.3f}", f"{r['unet_its']:.1f}",
                     " / ".join(f"{r[f'c{n}']:.2f}" for n in CONCURRENCY) if "c1" in r else "-",
                     f"{r['memory_mib']}", f"{sdpa[50] / r[50]:.2f}x"])
    body = f"""## GPU: sdtrt vs diffusers on {gpu}

{started}, one run of `benchmarks/gpu_bench.py` on **{gpu}**, model `{args.model}`: 512x512, batch 1, Euler a,
CFG 7, median of {args.repeats}. Speed-up is diffusers FP16 (SDPA)'s 50-step time divided by each row's.
U-Net it/s for sdtrt is Triton's own compute time of the unet model (2 rows per step: uncond + cond).

{table(["pipeline", "20 steps (s)", "50 steps (s)", "U-Net it/s", "images/s at 1 / 4 / 16 clients",
        "GPU memory (MiB)", "speed-up (50 steps)"], rows)}

Published anchors (SD 1.5, 512x512, FP16, batch 1): TensorRT 0.75 s / 50 steps on an H100 PCIe; stable-fast
104.6 U-Net it/s on an H100; TensorRT 9 + CUDA graphs 0.819 s / 61 it/s on an A100 80G.
"""
    write_section("gpu", body)
    print(body)


if __name__ == "__main__":
    main()
