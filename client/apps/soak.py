"""``sdtrt soak``: a bounded mixed load against a server for N minutes, and what it did to the server.

The load cycles through a fixed mix from several client threads: txt2img with different samplers, sizes and batch
sizes, the hires fix, img2img, inpainting, requests the server must refuse (a bad width), and requests whose
client gives up after a moment (cancelled). It reports requests and errors by kind, p50/p99 latency per kind,
and the resident memory (VmRSS) of tritonserver and of every Python stub at the start (after one warm-up round of
every kind, so that first-use allocations are not counted as growth) and at the end.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tritonclient.grpc as grpcclient

from sdtrt.contract.errors import InvalidRequest
from sdtrt.model_repository.serving.health import stub_processes

PICTURE = (np.indices((64, 64)).sum(axis=0)[..., None] * np.array([3, 2, 1]) % 256).astype(np.uint8)
MASK = np.zeros((64, 64), dtype=np.uint8)
MASK[16:48, 24:56] = 255


@dataclass(frozen=True)
class Kind:
    name: str
    run: Callable  # (client, seed) -> None; raises on failure
    expect: type | None = None  # the exception this kind must raise (a refusal), else it must succeed


def kinds() -> list[Kind]:
    def txt2img(**settings):
        return lambda client, seed: client.txt2img("a lighthouse on a cliff", seed=seed, **settings)

    def refused(client, seed):  # sent as-is, so that the server (not the client) refuses it

        width = grpcclient.InferInput("width", [1], "INT32")
        width.set_data_from_numpy(np.array([500], dtype=np.int32))
        raw = grpcclient.InferenceServerClient(client.url)
        try:
            raw.infer("txt2img", [width])
        finally:
            raw.close()

    loops = threading.local()  # one event loop per client thread, kept: gRPC's aio poller outlives each call

    def cancelled(client, seed):
        if getattr(loops, "loop", None) is None:
            loops.loop = asyncio.new_event_loop()
        give_up = asyncio.wait_for(client.atxt2img("a long walk", seed=seed, steps=150, width=128, height=128), 0.3)
        loops.loop.run_until_complete(give_up)

    return [
        Kind("txt2img Euler a 64px", txt2img(steps=8, width=64, height=64, sampler="Euler a")),
        Kind("txt2img DPM++ 2M Karras 96x64 x2", txt2img(steps=6, width=96, height=64, batch_size=2,
                                                          sampler="DPM++ 2M Karras")),
        Kind("txt2img hires fix", txt2img(steps=4, width=64, height=64, enable_hr=True, hr_scale=1.5,
                                          hr_second_pass_steps=3)),
        Kind("img2img", lambda c, seed: c.img2img("a painting", PICTURE, seed=seed, steps=8, width=64, height=64,
                                                   denoising_strength=0.6)),
        Kind("inpaint", lambda c, seed: c.img2img("a red door", PICTURE, mask=MASK, seed=seed, steps=8, width=64,
                                                   height=64)),
        Kind("refused (bad width)", refused, expect=Exception),
        Kind("cancelled by its client", cancelled, expect=asyncio.TimeoutError),
    ]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def server_memory(server_pid: int) -> dict[str, int]:
    """VmRSS (KiB) of tritonserver and of each of its Python stubs, by name."""
    memory = {"tritonserver": rss_kib(server_pid)}
    memory.update({instance: rss_kib(stub.pid) for instance, stub in sorted(stub_processes(server_pid).items())})
    return {name: kib for name, kib in memory.items() if kib is not None}


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, outcome: str, seconds: float) -> None:
        with self.lock:
            self.outcomes[(kind, outcome)] += 1
            if outcome == "ok":
                self.latencies[kind].append(seconds)


def attempt(kind: Kind, client, seed: int, tally: Tally) -> None:
    start = time.perf_counter()
    try:
        kind.run(client, seed)
        outcome = "ok" if kind.expect is None else "NOT refused"
    except InvalidRequest as exc:
        outcome = f"refused by the client: {exc.field}"
    except Exception as exc:  # every failure is counted by kind; none ends the soak
        expected = kind.expect is not None and isinstance(exc, kind.expect)
        outcome = "as expected" if expected else f"error: {type(exc).__name__}: {str(exc)[:80]}"
    tally.record(kind.name, outcome, time.perf_counter() - start)


def soak(client, server_pid: int, minutes: float, concurrency: int = 4, report: Callable[[str], None] = print) -> dict:
    """Run the mix for ``minutes`` from ``concurrency`` threads; returns the figures (and reports them)."""
    mix = kinds()
    at_ready = server_memory(server_pid)
    warm = Tally()
    for kind in mix:
        attempt(kind, client, 0, warm)
    start_memory = server_memory(server_pid)
    tally, deadline, counter = Tally(), time.monotonic() + 60 * minutes, iter(range(10**9))
    counter_lock = threading.Lock()

    def worker() -> None:
        while time.monotonic() < deadline:
            with counter_lock:
                i = next(counter)
            attempt(mix[i % len(mix)], client, i, tally)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    end_memory = server_memory(server_pid)
    result = summarize(tally, at_ready, start_memory, end_memory, elapsed, concurrency)
    report(format_report(result))
    return result


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(tally: Tally, at_ready: dict, start: dict, end: dict, elapsed: float, concurrency: int) -> dict:
    total_start, total_end = sum(start.values()), sum(end.values())
    return {
        "seconds": round(elapsed, 1),
        "concurrency": concurrency,
        "requests": sum(tally.outcomes.values()),
        "outcomes": {f"{kind}: {outcome}": n for (kind, outcome), n in sorted(tally.outcomes.items())},
        "errors": sum(n for (_, outcome), n in tally.outcomes.items() if outcome not in ("ok", "as expected")),
        "latency_s": {kind: {"n": len(v), "p50": round(_percentile(v, 50), 3), "p99": round(_percentile(v, 99), 3)}
                      for kind, v in sorted(tally.latencies.items()) if v},
        "memory_kib": {name: {"ready": at_ready.get(name), "start": start.get(name), "end": end.get(name)}
                       for name in sorted(set(start) | set(end))},
        "memory_total_mib": {"ready": round(sum(at_ready.values()) / 1024, 1), "start": round(total_start / 1024, 1),
                             "end": round(total_end / 1024, 1)},
        "memory_growth_pct": round(100 * (total_end - total_start) / max(total_start, 1), 2),
    }


def format_report(result: dict) -> str:
    lines = [f"soak: {result['requests']} requests in {result['seconds']} s from {result['concurrency']} clients, "
             f"{result['errors']} unexpected"]
    lines += [f"  {name}: {n}" for name, n in result["outcomes"].items()]
    lines.append("latency (s, successful requests):")
    lines += [f"  {kind}: n={v['n']} p50={v['p50']} p99={v['p99']}" for kind, v in result["latency_s"].items()]
    total = result["memory_total_mib"]
    lines.append(f"resident memory (MiB, all server processes): at ready {total['ready']}, after warm-up "
                 f"{total['start']}, at the end {total['end']}: {result['memory_growth_pct']:+.2f}%")
    for name, m in result["memory_kib"].items():
        if m["start"] and m["end"]:
            lines.append(f"  {name}: {m['start'] / 1024:.0f} -> {m['end'] / 1024:.0f} MiB "
                         f"({100 * (m['end'] - m['start']) / m['start']:+.1f}%)")
    return "\n".join(lines)
