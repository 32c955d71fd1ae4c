"""sdtrt's own Prometheus metrics on Triton's /metrics: scraped after real requests, with values that follow them."""

from __future__ import annotations

import re
import urllib.request

import pytest

from sdtrt.client import Client


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_requests_steps_stages_and_batches_are_counted(server):
    client = Client(server.url)
    before = scrape(server)
    client.txt2img("a lighthouse", steps=5, width=64, height=64, seed=1, sampler="Euler")
    with pytest.raises(Exception, match="steps"):
        client.txt2img("a lighthouse", steps=0, width=64, height=64)  # refused before it reaches the server
    from servers import raw_infer

    with pytest.raises(Exception, match="steps"):  # sent as is: refused by the server, INVALID_ARG
        raw_infer(server, {"prompt": ("x", "BYTES"), "steps": (0, "INT32")})
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sdtrt_requests_total", job="txt2img", model="default", sampler="Euler", outcome="success") == 1
    assert delta("sdtrt_requests_total", job="txt2img", outcome="invalid_argument") == 1
    assert delta("sdtrt_denoising_steps_total", job="txt2img", model="default") == 5
    assert delta("sdtrt_request_duration_seconds_count", job="txt2img", model="default") == 1
    for stage in ("text", "denoise", "decode"):
        assert delta("sdtrt_stage_duration_seconds_count", job="txt2img", stage=stage) == 1, stage
    assert delta("sdtrt_network_batch_rows_count", network="unet") == 5  # one U-Net call a step
    assert delta("sdtrt_network_batch_rows_sum", network="unet") == 10  # uncond + cond rows
    assert delta("sdtrt_network_batch_requests_sum", network="unet") == 5
    assert delta("sdtrt_step_batch_loops_count", job="txt2img") == 5  # a lone loop: its own calls, unmerged
    assert delta("sdtrt_step_batch_loops_sum", job="txt2img") == 5
    assert "nv_inference_request_success" in after  # Triton's own metrics beside them


def test_the_grafana_dashboard_reads_metrics_the_server_has(server):
    """Every metric the dashboard queries is one this server exports (sdtrt's after a request, and Triton's)."""
    import json
    from pathlib import Path

    Client(server.url).txt2img("a lighthouse", steps=2, width=64, height=64, seed=2)
    exported = {m.group(1) for m in re.finditer(r"^(\w+?)(?:_bucket|_sum|_count)?[{ ]", scrape(server), re.M)}
    exported |= {m.group(0).split("{")[0] for m in re.finditer(r"^\w+", scrape(server), re.M)}
    dashboard = json.loads((Path(__file__).parents[1] / "docker" / "grafana" / "sdtrt-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\b((?:sdtrt|nv)_\w+)", target["expr"])}
    assert {"sdtrt_requests_total", "sdtrt_denoising_steps_total", "nv_inference_request_success"} <= queried
    missing = sorted(name for name in queried if name not in exported)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"


def test_concurrent_requests_step_together_and_the_merges_show(server):
    """Four requests of the same size at once: their loops send their steps as shared U-Net calls (more loops
    than calls in sdtrt_step_batch_loops; one at a time they would be equal), and each image is still the
    one its request gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    client = Client(server.url)
    settings = dict(steps=8, width=64, height=64, sampler="Euler a")
    alone = [client.txt2img("a lighthouse", seed=s, **settings).images for s in range(4)]
    before = scrape(server)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda s: client.txt2img("a lighthouse", seed=s, **settings).images, range(4)))
    after = scrape(server)
    calls = value(after, "sdtrt_step_batch_loops_count", job="txt2img") - value(before, "sdtrt_step_batch_loops_count", job="txt2img")
    loops = value(after, "sdtrt_step_batch_loops_sum", job="txt2img") - value(before, "sdtrt_step_batch_loops_sum", job="txt2img")
    assert loops == 4 * 8 and calls < loops, (calls, loops)
    for one, shared in zip(alone, together):
        assert np.abs(one.astype(int) - shared.astype(int)).max() <= 1
