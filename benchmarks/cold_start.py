"""Cold start: how long `sdtrt serve`'s server takes from start to ready, and to its first image, per model load.

    python benchmarks/cold_start.py [--repeats 2]

On the embedded default model: the server is started on an exported repository (networks on the Python backend,
the default serving options), the time to Triton's readiness and then to the first 64x64 image is taken, and the
server's log says when each model finished loading. Writes the "cold start" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, default_export, median, table, write_section  # noqa: E402

TARGET_S = 10.0  # ready within this on the default model (issue 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.client import Client
    from sdtrt.model_repository.configs import ServingOptions

    work, _, repo = default_export("sdtrt-cold-")
    ready, first, loads = [], [], {}
    for i in range(args.repeats):
        log = work / f"triton-{i}.log"
        start = time.perf_counter()
        with TritonServer(repo, http_port=18400, grpc_port=18401, metrics_port=18402, log_file=log):
            ready.append(time.perf_counter() - start)
            Client("127.0.0.1:18401").txt2img("a lighthouse", steps=2, width=64, height=64, seed=1)
            first.append(time.perf_counter() - start)
        stamps = [(m.group(2), m.group(1)) for m in re.finditer(r"^I\d+ (\S+) .*successfully loaded '([^']+)'",
                                                                 log.read_text(), re.M)]
        if stamps:
            t0 = min(_seconds(t) for _, t in stamps)
            for name, t in stamps:
                loads.setdefault(name, []).append(_seconds(t) - t0)
    options = ServingOptions()
    rows = [["ready (Triton's readiness)", f"{median(ready):.1f}"], ["first 64x64 image", f"{median(first):.1f}"]]
    order = sorted(loads, key=lambda name: median(loads[name]))
    load_rows = [[name, f"{median(loads[name]):.1f}"] for name in order]
    verdict = "meets" if median(ready) <= TARGET_S else "MISSES"
    body = f"""## Cold start: `sdtrt serve` to ready (embedded default model)

Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU. One run of `python benchmarks/cold_start.py --repeats
{args.repeats}` (median of {args.repeats} starts), networks on the Python backend (onnxruntime), one process per
model: {options.scheduler_instances} loops per job (txt2img, img2img) run as threads of one instance.

{table(["from start to", "seconds"], rows)}

Ready in {median(ready):.1f} s: {verdict} the target of {TARGET_S:.0f} s. When each model finished loading, from the
first one (Triton's log):

{table(["model", "s after the first"], load_rows)}

The networks load within a second or two; the two job models (each importing torch and diffusers once and
warming one sampler of each scheduler class up) take the rest. Before: one process per loop (8) and, for each
model, one more process Triton starts only to ask for config changes (``--disable-auto-complete-config`` now):
31 s.
"""
    write_section("cold start", body)
    print(body)


def _seconds(clock: str) -> float:
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


if __name__ == "__main__":
    main()
