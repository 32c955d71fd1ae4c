"""The job's step batcher (model_repository/models/step_batcher.py) on its own: which calls it merges, that a lone loop
never waits, the row limit, errors reaching every loop. The served path is tested in test_serving.py
(four concurrent requests, each image equal to its one-at-a-time image, and merged calls in the metrics)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sdtrt.model_repository.models.step_batcher import StepBatcher


class Recorder:
    """A network that doubles its input and records the rows of every call it gets."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[int] = []
        self.delay = delay

    def __call__(self, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls.append(int(values[0].shape[0]))
        time.sleep(self.delay)
        return {"out": values[0] * 2}


def run_loops(batcher: StepBatcher, net: Recorder, loops: int, steps: int, rows: int = 2,
              max_rows: int = 64) -> list[list[torch.Tensor]]:
    results: list[list[torch.Tensor]] = [[] for _ in range(loops)]
    start = threading.Barrier(loops)

    def loop(i: int) -> None:
        with batcher.denoising():
            start.wait()
            for step in range(steps):
                x = torch.full((rows, 3), float(100 * i + step))
                results[i].append(batcher.call("unet", [x], max_rows, net)["out"])

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_loops_that_denoise_together_share_each_call_and_get_their_own_rows_back():
    net, batcher = Recorder(delay=0.002), StepBatcher(max_wait=1.0)
    results = run_loops(batcher, net, loops=4, steps=5)
    assert net.calls == [8] * 5  # every step of the four loops in one call of 4 x 2 rows
    for i, outputs in enumerate(results):
        for step, out in enumerate(outputs):
            assert torch.equal(out, torch.full((2, 3), 2.0 * (100 * i + step)))


def test_a_lone_loop_never_waits():
    net, batcher = Recorder(), StepBatcher(max_wait=5.0)
    start = time.perf_counter()
    run_loops(batcher, net, loops=1, steps=20)
    assert time.perf_counter() - start < 1.0  # a wait of 5 s per step would show
    assert net.calls == [2] * 20


def test_calls_are_kept_within_the_rows_a_network_takes():
    net, batcher = Recorder(delay=0.002), StepBatcher(max_wait=0.2)
    run_loops(batcher, net, loops=4, steps=3, rows=2, max_rows=4)
    assert max(net.calls) <= 4 and sum(net.calls) == 4 * 3 * 2


def test_different_shapes_are_not_merged():
    net, batcher = Recorder(), StepBatcher(max_wait=0.05)
    out = {}

    def loop(key: str, rows: int) -> None:
        with batcher.denoising():
            out[key] = batcher.call(key, [torch.ones(rows, 3)], 64, net)["out"]

    threads = [threading.Thread(target=loop, args=(k, r)) for k, r in (("64x64", 2), ("96x96", 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(net.calls) == [2, 4] and out["64x64"].shape[0] == 2 and out["96x96"].shape[0] == 4


def test_a_loop_that_leaves_does_not_hold_the_others_up():
    """A loop that stops denoising (done, cancelled) is no longer waited for: the others' next call goes at once,
    not after max_wait."""
    net, batcher = Recorder(), StepBatcher(max_wait=5.0)
    leaving = threading.Event()

    def short() -> None:
        with batcher.denoising():
            leaving.wait()

    thread = threading.Thread(target=short)
    thread.start()
    time.sleep(0.05)
    with batcher.denoising():
        threading.Timer(0.1, leaving.set).start()
        start = time.perf_counter()
        batcher.call("unet", [torch.ones(2, 3)], 64, net)
    thread.join()
    assert time.perf_counter() - start < 2.0


def test_a_failed_call_fails_every_loop_it_carried():
    batcher = StepBatcher(max_wait=1.0)

    def broken(values):
        raise RuntimeError("unet: out of memory")

    errors = []

    def loop() -> None:
        with batcher.denoising():
            barrier.wait()
            try:
                batcher.call("unet", [torch.ones(2, 3)], 64, broken)
            except RuntimeError as exc:
                errors.append(str(exc))

    barrier = threading.Barrier(3)
    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["unet: out of memory"] * 3


@pytest.mark.parametrize("loops", [2, 3])
def test_merges_are_reported(loops):
    sizes = []
    batcher = StepBatcher(max_wait=1.0, on_merge=sizes.append)
    run_loops(batcher, Recorder(delay=0.002), loops=loops, steps=2)
    assert sizes == [loops, loops]
