"""sdtrt vs diffusers on this machine's CPU, side by side in one run, for each CPU engine.

    python benchmarks/cpu_bench.py [--model tiny|half] [--size 512] [--steps 20] [--repeats 3]
                                   [--engines auto:fp32,onnxruntime:fp32,openvino:fp32,auto:bf16]

On the same weights, prompt, seed and settings: diffusers' StableDiffusionPipeline (PyTorch, fp32), and for each
CPU engine sdtrt's in-process runner and sdtrt served by a real tritonserver (gRPC, the whole pipeline, one
request at a time). ``auto`` is the served default (each network on the faster fp32 engine, measured at its first
start), ``auto:bf16`` what `sdtrt serve --fast` runs. ``--model tiny`` is the embedded default model; ``--model
half`` is SD 1.5's layout at half its widths (an SD-shaped model whose cost per step is a quarter of SD 1.5's).
Writes the "cpu-<model>" section of benchmarks/RESULTS.md: served time over diffusers' (targets: fp32 faster
than diffusers at <= 2/255 of its picture; bf16 at most 0.45x with PSNR >= 30 dB), served over in-process with the
same engine (the serving overhead), and each picture's difference from diffusers'. Every engine is held twice at
once (in-process and served): with ``--model half`` the four default engines need more than 24 GB, so measure
``--engines auto:fp32,auto:bf16`` there (what ``auto`` chose between, with both engines' timings, is listed; the
in-process runner reads the served networks' choice).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, default_export, model_parser, median, table, timed, write_section  # noqa: E402

# auto: the served default (--cpu-engine auto: the faster fp32 engine, measured per network); auto:bf16 is what
# `sdtrt serve --fast` runs (auto with OpenVINO bf16 among the candidates where the CPU has it natively)
ENGINES = "auto:fp32,onnxruntime:fp32,openvino:fp32,auto:bf16"


def cpu_flags() -> str:
    """The CPU features the engines' speed depends on (bf16 runs natively only with them)."""
    # (imported after sys.path is set up, as the benchmark's other sdtrt imports)
    from sdtrt.pipeline.runners import cpu_description

    return ", ".join(cpu_description()[1]) or "none of AVX2/AVX-512"


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--engines", default=ENGINES, help="ENGINE:PRECISION,... (default: %(default)s)")
    args = parser.parse_args()

    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.client import Client
    from sdtrt.client.apps.cli import cpu_engine_report
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

    def diffusers_run() -> np.ndarray:
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
                   generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
        return (out[0] * 255).round().astype(np.uint8)

    # Every pipeline at once (one server per engine, each on its own ports and copy of the repository), measured
    # in rounds: one run of each per round, the median over rounds. A machine whose speed drifts (shared cores)
    # then slows every pipeline alike instead of whichever happened to run last.
    engines = [tuple(entry.split(":")) for entry in args.engines.split(",")]
    runs: dict[str, Callable[[], np.ndarray]] = {"diffusers": diffusers_run}
    chosen: dict[str, list[str]] = {}
    with contextlib.ExitStack() as stack:
        for i, (engine, precision) in enumerate(engines):
            label = f"{engine} {precision}"
            copy = work / f"repo-{engine}-{precision}"
            shutil.copytree(repo, copy)
            write_repository(copy, None, ServingOptions(cpu_engine=engine, cpu_precision=precision))
            ports = dict(http_port=18000 + 10 * i, grpc_port=18001 + 10 * i, metrics_port=18002 + 10 * i)
            # (the server first: auto measures there, and the in-process runner reads the same choice back)
            server = stack.enter_context(TritonServer(copy, log_file=work / f"triton-{engine}-{precision}.log", **ports))
            chosen[label] = cpu_engine_report(copy)
            local = LocalPipeline(copy, backend=engine, precision=precision)
            runs[f"{label} in-process"] = lambda local=local: local.txt2img(Txt2ImgRequest(prompt, **settings)).images[0]
            client = Client(server.url)
            runs[f"{label} served"] = lambda client=client: client.txt2img(prompt, **settings).images[0]
        pictures = {name: run() for name, run in runs.items()}  # (the warm-up round)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name] += timed(run, 1, warmup=0)
    body = report(args, {name: median(values) for name, values in times.items()}, pictures, engines, chosen)
    write_section(f"cpu-{args.model}", body)
    print(body)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


TARGETS = {"fp32": ("faster than diffusers, <= 2/255", lambda ratio, diff, db: ratio < 1.0 and diff <= 2),
           "bf16": ("<= 0.45x, PSNR >= 30 dB", lambda ratio, diff, db: ratio <= 0.45 and db >= 30)}


def report(args, seconds: dict[str, float], pictures: dict[str, np.ndarray], engines, chosen) -> str:
    base, reference = seconds["diffusers"], pictures["diffusers"]
    rows = [["diffusers (PyTorch fp32)", f"{base:.2f}", "1.00", "", "", "", ""]]
    for engine, precision in engines:
        label = f"{engine} {precision}"
        name = {"auto fp32": "auto (the default)", "auto bf16": "auto bf16 (`serve --fast`)"}.get(label, label)
        for where in ("in-process", "served"):
            t, picture = seconds[f"{label} {where}"], pictures[f"{label} {where}"]
            diff, db = int(np.abs(picture.astype(int) - reference.astype(int)).max()), psnr(picture, reference)
            goal, met = TARGETS[precision]
            rows.append([f"sdtrt {name}: " + ("**served** (Triton, gRPC)" if where == "served" else "in-process"),
                         f"{t:.2f}", f"**{t / base:.2f}**" if where == "served" else f"{t / base:.2f}",
                         f"{t / seconds[f'{label} in-process']:.2f}" if where == "served" else "", str(diff),
                         f"{db:.1f}", f"{goal}: {'meets' if met(t / base, diff, db) else 'misses'}"
                         if where == "served" else ""])
    choices = "\n".join(f"- `{label}`: " + "; ".join(line.removeprefix("cpu engine: ") for line in lines)
                         for label, lines in chosen.items() if lines)
    return f"""## CPU: sdtrt vs diffusers, model `{args.model}`

Machine: {cpu_name()}, {os.cpu_count()} cores ({cpu_flags()}), no GPU. One run of `python benchmarks/cpu_bench.py
--model {args.model} --size {args.size} --steps {args.steps} --repeats {args.repeats}`: {args.size}x{args.size},
{args.steps} steps, Euler a, CFG 7, batch 1, one request at a time; every pipeline in each of {args.repeats} rounds
(one run each, after a warm-up round), median over the rounds; model `{args.model}`
({"the embedded default model" if args.model == "tiny" else "SD 1.5's layout at half its widths"}). Each picture
against diffusers' on the same weights, prompt and seed: its largest pixel difference (out of 255) and PSNR.

{table(["pipeline", "seconds per image", "time vs diffusers", "served vs in-process", "max diff", "PSNR (dB)",
        "target"], rows)}

What `auto` chose on this machine, per network (the first start's measurement, printed by `sdtrt serve`):
{choices}

fp32 rows compute as diffusers does; bf16 computes in bfloat16 where the CPU has it (as FP16 engines do on a GPU).
"""


if __name__ == "__main__":
    main()
