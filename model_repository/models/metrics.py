"""sdtrt's own Prometheus metrics, through Triton's custom metrics API: served on Triton's ``/metrics`` beside its
``nv_*`` metrics, with no extra port or process (importable only inside Triton's Python stub).

* ``sdtrt_requests_total{job, model, sampler, outcome}``: requests by outcome (success, invalid_argument,
  cancelled, error).
* ``sdtrt_requests_running{job}``: requests a job's loops are running now (``sdtrt serve`` waits for 0 before it
  stops the server, so that a pod being scaled in finishes its generations).
* ``sdtrt_request_duration_seconds{job, model}``: end-to-end time of the requests that succeeded.
* ``sdtrt_stage_duration_seconds{job, stage}``: where that time goes (text: tokenizer + text encoder; denoise: the
  loop, U-Net calls included; decode: the VAE decoder and the copy out).
* ``sdtrt_denoising_steps_total{job, model}``: U-Net steps run (rate: denoising steps/s).
* ``sdtrt_step_batch_loops{job}``: per U-Net call a job sent, how many of its loops' steps it carried (the
  step-level batching of ``step_batcher.py``).
* ``sdtrt_network_batch_rows{network}`` / ``sdtrt_network_batch_requests{network}``: per call of a network run by
  the Python backend, the rows it ran and how many requests Triton's batcher had merged into it.
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120]
ROWS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]

_FAMILIES: dict[str, "pb_utils.MetricFamily"] = {}
# The stub's metric calls are not thread-safe (Triton 2.51: two loop threads updating metrics at once crash the
# server with a boost::interprocess::lock_exception); every metric call of this process goes through this lock.
_LOCK = threading.Lock()


def _family(name: str, description: str, kind: str) -> "pb_utils.MetricFamily":
    """One family per name in this stub process (a family must outlive its metrics: they are kept together)."""
    if name not in _FAMILIES:
        _FAMILIES[name] = pb_utils.MetricFamily(name=name, description=description,
                                                kind=getattr(pb_utils.MetricFamily, kind))
    return _FAMILIES[name]


class Metrics:
    """The metrics one model instance records, created once per label set."""

    def __init__(self):
        self._metrics: dict[tuple, object] = {}

    def _metric(self, name: str, description: str, kind: str, labels: dict[str, str], buckets=None):
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            family = _family(name, description, kind)
            self._metrics[key] = (family.Metric(labels=labels, buckets=buckets) if buckets is not None
                                  else family.Metric(labels=labels))
        return self._metrics[key]

    def _record(self, name: str, description: str, kind: str, labels: dict[str, str], value: float,
                buckets=None) -> None:
        with _LOCK:
            metric = self._metric(name, description, kind, labels, buckets)
            if kind == "HISTOGRAM":
                metric.observe(value)
            else:
                metric.increment(value)

    def running(self, job: str, change: int) -> None:
        self._record("sdtrt_requests_running", "Generation requests the job's loops are running now", "GAUGE",
                     {"job": job}, change)

    def request(self, job: str, model: str, sampler: str, outcome: str) -> None:
        self._record("sdtrt_requests_total", "Generation requests by job, model, sampler and outcome", "COUNTER",
                     {"job": job, "model": model, "sampler": sampler, "outcome": outcome}, 1)

    def duration(self, job: str, model: str, seconds: float) -> None:
        self._record("sdtrt_request_duration_seconds", "End-to-end time of successful generation requests",
                     "HISTOGRAM", {"job": job, "model": model}, seconds, SECONDS)

    def stage(self, job: str, stage: str, seconds: float) -> None:
        self._record("sdtrt_stage_duration_seconds", "Time per pipeline stage of a request (text, denoise, decode)",
                     "HISTOGRAM", {"job": job, "stage": stage}, seconds, SECONDS)

    def steps(self, job: str, model: str, count: int) -> None:
        if count:
            self._record("sdtrt_denoising_steps_total", "Denoising (U-Net) steps run", "COUNTER",
                         {"job": job, "model": model}, count)

    def batch(self, network: str, rows: int, requests: int) -> None:
        self._record("sdtrt_network_batch_rows", "Rows per network call (the merged batch)", "HISTOGRAM",
                     {"network": network}, rows, ROWS)
        self._record("sdtrt_network_batch_requests", "Requests Triton's batcher merged into one network call",
                     "HISTOGRAM", {"network": network}, requests, ROWS)

    def step_batch(self, job: str, loops: int) -> None:
        self._record("sdtrt_step_batch_loops", "Denoising loops whose steps one U-Net call carried", "HISTOGRAM",
                     {"job": job}, loops, ROWS)
