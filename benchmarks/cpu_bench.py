"""sdtrt vs diffusers on this machine's CPU, side by side in one run, for each CPU engine.

    python benchmarks/cpu_bench.py [--model tiny|half] [--size 512] [--steps 20] [--repeats 3]
                                   [--engines onnxruntime:fp32,openvino:fp32,openvino:bf16]

On the same weights, prompt, seed and settings: diffusers' StableDiffusionPipeline (PyTorch, fp32), and for each
CPU engine sdtrt's in-process runner and sdtrt served by a real tritonserver (gRPC, the whole pipeline, one
request at a time). ``--model tiny`` is the embedded default model; ``--model half`` is SD 1.5's layout at half
its widths (an SD-shaped model whose cost per step is a quarter of SD 1.5's). Writes the "cpu-<model>" section
of benchmarks/RESULTS.md with two ratios: served time over diffusers' (the target is at most 0.7) and served
over in-process with the same engine (the serving overhead; the target is at most 1.05).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, default_export, model_parser, median, table, timed, write_section  # noqa: E402

ENGINES = "onnxruntime:fp32,openvino:fp32,openvino:bf16"


def cpu_flags() -> str:
    """The CPU features the engines' speed depends on (bf16 runs natively only with them)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none of AVX2/AVX-512"


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--engines", default=ENGINES, help="ENGINE:PRECISION,... (default: %(default)s)")
    args = parser.parse_args()

    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.client import Client
    from sdtrt.pipeline.local import LocalPipeline
    from sdtrt.model_repository.build import write_repository
    from sdtrt.model_repository.configs import ServingOptions
    from sdtrt.requests.request import Txt2ImgRequest

    work, model, repo = default_export("sdtrt-cpu-bench-", args.model)
    prompt, size, steps = "a lighthouse on a cliff at dawn, oil painting", args.size, args.steps
    settings = dict(sampler="Euler a", steps=steps, guidance_scale=7.0, seed=42, width=size, height=size)

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True, dtype=torch.float32)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_run():
        pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
             generator=torch.Generator("cpu").manual_seed(42))

    # Every pipeline at once (one server per engine, each on its own ports and copy of the repository), measured
    # in rounds: one run of each per round, the median over rounds. A machine whose speed drifts (shared cores)
    # then slows every pipeline alike instead of whichever happened to run last.
    engines = [tuple(entry.split(":")) for entry in args.engines.split(",")]
    runs: dict[str, Callable[[], object]] = {"diffusers": diffusers_run}
    with contextlib.ExitStack() as stack:
        for i, (engine, precision) in enumerate(engines):
            label = f"{engine} {precision}"
            copy = work / f"repo-{engine}-{precision}"
            shutil.copytree(repo, copy)
            write_repository(copy, None, ServingOptions(cpu_engine=engine, cpu_precision=precision))
            local = LocalPipeline(copy, backend=engine, precision=precision)
            runs[f"{label} in-process"] = lambda local=local: local.txt2img(Txt2ImgRequest(prompt, **settings))
            ports = dict(http_port=18000 + 10 * i, grpc_port=18001 + 10 * i, metrics_port=18002 + 10 * i)
            server = stack.enter_context(TritonServer(copy, log_file=work / f"triton-{engine}-{precision}.log", **ports))
            client = Client(server.url)
            runs[f"{label} served"] = lambda client=client: client.txt2img(prompt, **settings)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for name, run in runs.items():  # warm-up
            run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name] += timed(run, 1, warmup=0)
    seconds = {name: median(values) for name, values in times.items()}
    base = seconds["diffusers"]
    rows = [["diffusers (PyTorch fp32)", f"{base:.2f}", "1.00", "", ""]]
    for engine, precision in engines:
        in_process, served = seconds[f"{engine} {precision} in-process"], seconds[f"{engine} {precision} served"]
        rows.append([f"sdtrt {engine} {precision}: in-process", f"{in_process:.2f}", f"{in_process / base:.2f}", "", ""])
        rows.append([f"sdtrt {engine} {precision}: **served** (Triton, gRPC)", f"{served:.2f}", f"**{served / base:.2f}**",
                     f"{served / in_process:.2f}", "meets" if served / base <= 0.7 else "misses"])

    body = f"""## CPU: sdtrt vs diffusers, model `{args.model}`

Machine: {cpu_name()}, {os.cpu_count()} cores ({cpu_flags()}), no GPU. One run of `python benchmarks/cpu_bench.py
--model {args.model} --size {size} --steps {steps} --repeats {args.repeats}`: {size}x{size}, {steps} steps, Euler a,
CFG 7, batch 1, one request at a time; every pipeline in each of {args.repeats} rounds (one run each, after a
warm-up round), median over the rounds; model `{args.model}`
({"the embedded default model" if args.model == "tiny" else "SD 1.5's layout at half its widths"}).

{table(["pipeline", "seconds per image", "time vs diffusers", "served vs in-process", "target 0.7x diffusers"], rows)}

bf16 rows compute in bfloat16 where the CPU has it (pictures within a few levels of fp32's, as FP16 engines are
on a GPU); fp32 rows compute as diffusers does.
"""
    write_section(f"cpu-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
