"""Shared by the benchmark scripts: timing, and writing one section of RESULTS.md."""

from __future__ import annotations

import argparse
import csv
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).with_name("RESULTS.md")


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers; other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def perf_analyzer(repo: Path, url: str, concurrency: int, out: Path) -> dict:
    """perf_analyzer on the txt2img model at one concurrency: images/s and latency percentiles (ms)."""
    from sdtrt.contract.spec import TXT2IMG as PIPELINE
    from sdtrt.model_repository.serving.server import perf_analyzer_command
    from sdtrt.model_repository.perf import PERF_INPUT

    report = out / f"perf_c{concurrency}.csv"
    args = ["-m", PIPELINE, "-u", url, "-i", "grpc", "--input-data", str(repo / PIPELINE / PERF_INPUT),
            "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
            "--measurement-request-count", str(max(8, 2 * concurrency)), "--stability-percentage", "50",
            "--percentile", "99", "-f", str(report)]
    command, env = perf_analyzer_command(args)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not report.is_file():
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-1:] or ["perf_analyzer failed"]}
    row = next(csv.DictReader(report.open()))
    return {"images_s": float(row["Inferences/Second"]), "p50_ms": int(row["p50 latency"]) / 1000,
            "p99_ms": int(row["p99 latency"]) / 1000}


def model_parser(doc: str | None, size: int = 512) -> argparse.ArgumentParser:
    """The flags of the benchmarks that measure one model at one setting: --model, --steps, --size, --repeats."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "half"], default="tiny",
                        help="tiny: the embedded default model; half: SD 1.5's layout at half its widths")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def default_export(prefix: str, size: str = "tiny") -> tuple[Path, Path, Path]:
    """(work folder, the embedded default model at ``size`` (tiny, half: SD 1.5's layout at half width), its
    export) in a fresh temporary folder: what most benchmarks measure on."""
    import tempfile

    from sdtrt.pipeline.default_model import build_default_model
    from sdtrt.export import export_model

    work = Path(tempfile.mkdtemp(prefix=prefix))
    model = build_default_model(work / "default", size=size)
    export_model(model, work / "repo", progress=False, report=lambda *_: None)
    return work, model, work / "repo"
