"""sdtrt vs diffusers on this machine's CPU, side by side in one run (the embedded default model).

    python benchmarks/cpu_bench.py [--steps 20] [--size 512] [--repeats 3]

Measures, on the same weights, prompt, seed and settings: diffusers' StableDiffusionPipeline (PyTorch, fp32),
sdtrt's in-process onnxruntime runner, and sdtrt served by a real tritonserver (gRPC, the whole pipeline), and
writes the "cpu" section of benchmarks/RESULTS.md with the ratios. The default model is tiny, so this measures
the serving machinery's overhead and onnxruntime vs PyTorch on small networks, not SD 1.5's speed (that is
benchmarks/gpu.sh's job).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, median, table, timed, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from sdtrt.client import Client
    from sdtrt.default_model import build_default_model
    from sdtrt.export import export_model
    from sdtrt.local import LocalPipeline
    from sdtrt.app.server import TritonServer
    from sdtrt.request import Txt2ImgRequest

    work = Path(tempfile.mkdtemp(prefix="sdtrt-bench-"))
    model = build_default_model(work / "default")
    repo = work / "repo"
    export_model(model, repo, progress=False, report=lambda *_: None)
    prompt, size, steps = "a lighthouse on a cliff at dawn, oil painting", args.size, args.steps
    settings = dict(sampler="Euler a", steps=steps, guidance_scale=7.0, seed=42, width=size, height=size)

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True, dtype=torch.float32)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_run():
        pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
             generator=torch.Generator("cpu").manual_seed(42))

    local = LocalPipeline(repo)
    results = {"diffusers (PyTorch fp32)": timed(diffusers_run, args.repeats),
               "sdtrt in-process (onnxruntime)": timed(lambda: local.txt2img(Txt2ImgRequest(prompt, **settings)),
                                                       args.repeats)}
    with TritonServer(repo, http_port=18000, grpc_port=18001, metrics_port=18002, log_file=work / "triton.log"):
        client = Client("127.0.0.1:18001")
        results["sdtrt served (Triton, gRPC)"] = timed(lambda: client.txt2img(prompt, **settings), args.repeats)

        def burst():  # concurrent clients: throughput with the U-Net batching steps across requests
            threads = [threading.Thread(target=lambda s=s: client.txt2img(prompt, **{**settings, "seed": s}))
                       for s in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        burst_time = median(timed(burst, max(1, args.repeats - 1)))

    base = median(results["diffusers (PyTorch fp32)"])
    rows = [[name, f"{median(t):.2f}", f"{base / median(t):.2f}x"] for name, t in results.items()]
    served = median(results["sdtrt served (Triton, gRPC)"])
    body = f"""## CPU: sdtrt vs diffusers on this machine (embedded default model)

Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU. One run of `python benchmarks/cpu_bench.py --steps {steps}
--size {size} --repeats {args.repeats}`: {size}x{size}, {steps} steps, Euler a, CFG 7, batch 1, median of
{args.repeats} after a warm-up. Speed-up is diffusers' time divided by each row's.

{table(["pipeline", "seconds per image", "speed-up vs diffusers"], rows)}

Served throughput with {args.concurrency} concurrent clients: {args.concurrency / burst_time:.2f} images/s
({burst_time:.2f} s for the burst) vs {1 / served:.2f} images/s one at a time.

The default model is tiny (a few MB), so per-step work is small and these ratios measure onnxruntime against
PyTorch on small networks plus the serving machinery's overhead; SD 1.5-sized numbers come from
`benchmarks/gpu.sh` on a GPU.
"""
    write_section("cpu", body)
    print(body)


if __name__ == "__main__":
    main()
