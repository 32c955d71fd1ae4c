"""perf_analyzer over the served txt2img model at concurrency 1..8: throughput and latency percentiles, a table and
a plot (the embedded default model, this machine's CPU).

    python benchmarks/perf_sweep.py [--max-concurrency 8]

The server runs on a fresh export with the default serving options; perf_analyzer (from the tritonclient wheel)
sends the export's own input file (``txt2img/perf_input.json``: the model's native size, 20 steps). Writes the
"perf sweep" section of benchmarks/RESULTS.md and benchmarks/perf_sweep.png (with matplotlib; `pip install
"sdtrt[bench]"`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, default_export, perf_analyzer, table, write_section  # noqa: E402

PLOT = Path(__file__).with_name("perf_sweep.png")


def plot(levels: list[int], results: list[dict], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, left = plt.subplots(figsize=(7, 4))
    ok = [(c, r) for c, r in zip(levels, results) if "error" not in r]
    left.plot([c for c, _ in ok], [r["images_s"] for _, r in ok], "o-", color="tab:blue", label="images/s")
    left.set_xlabel("concurrent requests")
    left.set_ylabel("images/s", color="tab:blue")
    right = left.twinx()
    right.plot([c for c, _ in ok], [r["p50_ms"] / 1000 for _, r in ok], "s--", color="tab:red", label="p50 latency")
    right.plot([c for c, _ in ok], [r["p99_ms"] / 1000 for _, r in ok], "^:", color="tab:red", label="p99 latency")
    right.set_ylabel("latency (s)", color="tab:red")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    left.set_title(title, fontsize=9)
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-concurrency", type=int, default=8)
    args = parser.parse_args()

    from sdtrt.model_repository.serving.server import TritonServer

    work, _, repo = default_export("sdtrt-sweep-")
    levels = [c for c in (1, 2, 3, 4, 6, 8, 12, 16) if c <= args.max_concurrency]
    with TritonServer(repo, http_port=18500, grpc_port=18501, metrics_port=18502, log_file=work / "triton.log"):
        results = [perf_analyzer(repo, "127.0.0.1:18501", c, work) for c in levels]
    rows = [[c, *(("failed", r["error"][0], "") if "error" in r else
                  (f"{r['images_s']:.2f}", f"{r['p50_ms'] / 1000:.2f}", f"{r['p99_ms'] / 1000:.2f}"))]
            for c, r in zip(levels, results)]
    title = f"sdtrt txt2img served, default model 512x512 20 steps, {cpu_name()} ({os.cpu_count()} cores)"
    plotted = plot(levels, results, title)
    body = f"""## perf_analyzer sweep of the served txt2img model (embedded default model)

Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU. One run of `python benchmarks/perf_sweep.py
--max-concurrency {args.max_concurrency}`: perf_analyzer (gRPC) with the export's input file (native size 512x512,
20 steps, Euler a), count windows of at least 8 requests per level.

{table(["concurrency", "images/s", "p50 latency (s)", "p99 latency (s)"], rows)}

{"![throughput and latency vs concurrency](perf_sweep.png)" if plotted else
 "(no plot: matplotlib is not installed; `pip install 'sdtrt[bench]'`)"}
"""
    write_section("perf sweep", body)
    print(body)


if __name__ == "__main__":
    main()
