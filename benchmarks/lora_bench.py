"""What per-request LoRAs cost, side by side in one run on one server (the embedded default model).

    python benchmarks/lora_bench.py [--steps 20] [--size 512] [--repeats 9] [--rank 16]

Two models of the same weights in one repository: ``plain`` exported as before, ``loras`` with a LoRA registered
(``--loras``). Measured in turns on the same server: a request without a tag on each (the target: the second at
most 5% slower than the first, as registering LoRAs must not tax requests that use none), and a request with
``<lora:bench:0.8>`` (the price of the LoRA path itself). Writes the "lora" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the tests' LoRA maker (peft, offline)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, median, table, write_section  # noqa: E402

TARGET = 1.05  # a request without LoRAs on a model with LoRAs registered, vs the same model without


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import time

    from loras import make_lora

    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.client import Client
    from sdtrt.pipeline.default_model import build_default_model
    from sdtrt.export import export_model

    work = Path(tempfile.mkdtemp(prefix="sdtrt-lora-bench-"))
    model = build_default_model(work / "default")
    make_lora(model, work / "loras", text_encoder=True, rank=args.rank, name="bench")
    repo = work / "repo"
    quiet = dict(progress=False, report=lambda *_: None)
    export_model(model, repo, name="plain", **quiet)
    export_model(model, repo, name="loras", lora_dir=work / "loras", **quiet)
    prompt = "a lighthouse on a cliff at dawn, oil painting"
    settings = dict(sampler="Euler a", steps=args.steps, guidance_scale=7.0, seed=42, width=args.size,
                    height=args.size)
    cases = {
        "plain model, no tag": ("plain", prompt),
        "model with LoRAs registered, no tag": ("loras", prompt),
        "model with LoRAs registered, <lora:bench:0.8>": ("loras", prompt + " <lora:bench:0.8>"),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    with TritonServer(repo, http_port=18100, grpc_port=18101, metrics_port=18102, log_file=work / "triton.log"):
        client = Client("127.0.0.1:18101")
        for repeat in range(args.repeats + 1):  # in turns, so that drift in the machine hits every case alike
            for name, (key, text) in cases.items():
                start = time.perf_counter()
                client.txt2img(text, model=key, **settings)
                if repeat:  # the first round warms up
                    times[name].append(time.perf_counter() - start)

    base = median(times["plain model, no tag"])
    fastest = min(times["plain model, no tag"])
    rows = [[name, f"{median(t):.3f}", f"{median(t) / base:.3f}", f"{min(t):.3f}", f"{min(t) / fastest:.3f}"]
            for name, t in times.items()]
    ratio = median(times["model with LoRAs registered, no tag"]) / base
    verdict = "meets" if ratio <= TARGET else "MISSES"
    body = f"""## LoRAs per request: what they cost (embedded default model, served)

Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU. One run of `python benchmarks/lora_bench.py --steps
{args.steps} --size {args.size} --repeats {args.repeats} --rank {args.rank}`: one tritonserver, two models of the
same weights (one exported with a rank-{args.rank} LoRA registered on its text encoder and U-Net), requests in
turns, {args.size}x{args.size}, {args.steps} steps, Euler a, median of {args.repeats} after a warm-up round.

{table(["request", "median s per image", "vs plain model", "fastest s", "vs plain model (fastest)"], rows)}

A request without a tag runs the same networks as before registering (the LoRA variants are separate Triton
models), so it pays {100 * (ratio - 1):+.1f}% (median; the fastest runs differ by
{100 * (min(times["model with LoRAs registered, no tag"]) / fastest - 1):+.1f}%): {verdict} the target of at most
{100 * (TARGET - 1):.0f}%; differences of a few percent either way are this machine's noise. A request
with a tag runs the LoRA variants and sends every step its LoRA matrices (the last row); at SD 1.5 size that cost
has not been measured yet (it needs the TensorRT path on a GPU).
"""
    write_section("lora", body)
    print(body)


if __name__ == "__main__":
    main()
