"""Where a served request's time goes, next to the in-process runner's, stage by stage (one request at a time).

    python benchmarks/overhead_trace.py [--model tiny|half] [--size 512] [--steps 20] [--repeats 3]

In-process, each network call is timed around its runner. Served, the same split comes from the server itself:
Triton's per-model statistics (``/v2/models/stats``: queue, input copy, compute, output copy of every network
call) and sdtrt's stage metrics from the job model (``sdtrt_stage_duration_seconds``: text, denoise, decode).
What is left of the denoising stage after the U-Net's own time is the loop: the scheduler steps and, served, the
BLS round trips. Writes the "overhead" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, default_export, model_parser, table, write_section  # noqa: E402

PORTS = dict(http_port=18500, grpc_port=18501, metrics_port=18502)


def triton_stats() -> dict[str, dict[str, float]]:
    """Seconds spent so far per model and phase, and its request and execution counts."""
    data = json.load(urllib.request.urlopen(f"http://127.0.0.1:{PORTS['http_port']}/v2/models/stats", timeout=10))
    out = {}
    for model in data["model_stats"]:
        s = model["inference_stats"]
        out[model["name"]] = {k: s[k]["ns"] / 1e9 for k in ("queue", "compute_input", "compute_infer", "compute_output")}
        out[model["name"]]["requests"] = s["success"]["count"]
    return out


def stage_sums() -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{PORTS['metrics_port']}/metrics", timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^sdtrt_stage_duration_seconds_sum\{job="txt2img",stage="(\w+)"\} (\S+)$', text, re.M)}


def main() -> None:
    parser = model_parser(__doc__)
    args = parser.parse_args()

    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.client import Client
    from sdtrt.pipeline.local import LocalPipeline
    from sdtrt.requests.request import Txt2ImgRequest

    work, _, repo = default_export("sdtrt-trace-", args.model)
    prompt = "a lighthouse on a cliff at dawn, oil painting"
    settings = dict(sampler="Euler a", steps=args.steps, guidance_scale=7.0, seed=42, width=args.size,
                    height=args.size)
    n = args.repeats

    local = LocalPipeline(repo)
    spent: dict[str, float] = defaultdict(float)
    for name, runner in local.nets.items():
        def timed_outputs(feed, _run=runner.outputs, _name=name):
            start = time.perf_counter()
            try:
                return _run(feed)
            finally:
                spent[_name] += time.perf_counter() - start
        runner.outputs = timed_outputs
    local.txt2img(Txt2ImgRequest(prompt, **settings))  # warm-up
    spent.clear()
    start = time.perf_counter()
    for _ in range(n):
        local.txt2img(Txt2ImgRequest(prompt, **settings))
    local_total = (time.perf_counter() - start) / n
    local_parts = {k: v / n for k, v in spent.items()}

    with TritonServer(repo, log_file=work / "triton.log", **PORTS):
        client = Client(f"127.0.0.1:{PORTS['grpc_port']}")
        client.txt2img(prompt, **settings)  # warm-up
        stats0, stages0 = triton_stats(), stage_sums()
        start = time.perf_counter()
        for _ in range(n):
            client.txt2img(prompt, **settings)
        served_total = (time.perf_counter() - start) / n
        stats1, stages1 = triton_stats(), stage_sums()
    delta = {m: {k: (stats1[m][k] - stats0[m].get(k, 0)) / n for k in stats1[m]} for m in stats1}
    stages = {k: (stages1[k] - stages0.get(k, 0)) / n for k in stages1}
    unet = delta["default__unet"]
    unet_compute = unet["compute_infer"]
    unet_transport = unet["queue"] + unet["compute_input"] + unet["compute_output"]
    local_loop = max(0.0, local_total - sum(local_parts.values()))
    served_loop = stages["denoise"] - unet_compute - unet_transport
    rest = served_total - sum(stages.values())

    def ms(seconds: float) -> str:
        return f"{1000 * seconds:.1f}"

    rows = [
        ["text: tokenizer + text encoder", ms(local_parts.get("text_encoder", 0)), ms(stages["text"])],
        ["U-Net: the network's own compute", ms(local_parts["unet"]), ms(unet_compute)],
        ["U-Net: Triton queue + input/output copies", "-", ms(unet_transport)],
        ["loop: scheduler steps (+ served: the BLS round trips)", ms(local_loop), ms(served_loop)],
        ["decode: VAE decoder + uint8 pictures", ms(local_parts["vae_decoder"]), ms(stages["decode"])],
        ["request: gRPC, the job's inputs, the response", "-", ms(rest)],
        ["**total per image**", ms(local_total), ms(served_total)],
    ]
    per_step = (served_loop - local_loop + unet_transport) / args.steps
    body = f"""## Where the time goes: served vs in-process, stage by stage (model `{args.model}`)

Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU. One run of `python benchmarks/overhead_trace.py --model
{args.model} --size {args.size} --steps {args.steps} --repeats {n}`: {args.size}x{args.size}, {args.steps} steps,
Euler a, CFG 7, one request at a time, onnxruntime fp32 both ways; milliseconds per image, mean of {n}.

{table(["stage", "in-process (ms)", "served (ms)"], rows)}

Served / in-process: **{served_total / local_total:.3f}**. The serving machinery costs
{1000 * per_step:.2f} ms per denoising step (the loop's BLS round trip, Triton's queue and the U-Net's
input/output copies) and {1000 * rest:.1f} ms per request (gRPC and the job's own inputs and outputs).
The networks run in their own processes, their onnxruntime threads sleeping between calls (spinning threads
would take the cores the loop needs: ~2x latency on 2 cores, see sdtrt/pipeline/runners.py).
"""
    write_section(f"overhead-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
