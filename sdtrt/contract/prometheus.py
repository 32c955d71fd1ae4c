"""Reading Prometheus' text format (Triton's /metrics), for the few places that ask a server about itself."""

from __future__ import annotations

import urllib.request
from typing import Iterator


def scrape(url: str, timeout: float = 5.0) -> str:
    """The metrics text at ``url`` (raises OSError when the server cannot be reached)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def samples(text: str) -> Iterator[tuple[str, str, float]]:
    """(metric name, its label set as written, value) for every sample line."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        try:
            yield name, labels.rstrip("}"), float(value)
        except ValueError:
            continue
