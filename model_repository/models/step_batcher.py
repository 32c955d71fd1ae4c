"""Step-level batching inside a job model: the U-Net calls of the loops that run at the same time, as one call.

A job instance runs several denoising loops in threads (``job_model.JobModel``). Each step, every loop needs one
U-Net call. Triton's dynamic batcher merges only the calls that happen to be queued together, and waits a fixed
delay for a lone request too. Here the loops know each other: a call waits for the other loops that are
denoising right now (at most ``max_wait`` seconds), then one of them sends all the waiting calls as one BLS
call and hands each loop its rows back. A lone loop never waits; four loops step together (measured in
benchmarks/batching_bench.py).

Only calls that can share a network call are merged: same network, same non-batch shapes, and together within
the rows the network accepts (a TensorRT engine with a fixed batch takes no merged calls at all).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

Tensors = list[torch.Tensor]
Run = Callable[[Tensors], dict[str, torch.Tensor]]


@dataclass
class _Call:
    values: Tensors
    result: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return int(self.values[0].shape[0])


@dataclass
class _Group:
    deadline: float
    calls: list[_Call] = field(default_factory=list)
    rows: int = 0
    full: bool = False
    taken: bool = False


class StepBatcher:
    def __init__(self, max_wait: float = 0.02, on_merge: Callable[[int], None] | None = None):
        """``max_wait``: the longest a call waits for the other denoising loops (they normally arrive within
        the few milliseconds of a scheduler step); ``on_merge(calls)`` is told each merged call's size."""
        self.max_wait = max_wait
        self.on_merge = on_merge
        self._cond = threading.Condition()
        self._denoising = 0
        self._open: dict[Hashable, _Group] = {}

    @contextlib.contextmanager
    def denoising(self):
        """Counts the calling loop among those whose next U-Net call is worth waiting for."""
        with self._cond:
            self._denoising += 1
        try:
            yield
        finally:
            with self._cond:
                self._denoising -= 1
                self._cond.notify_all()  # waiters may now have every loop there is

    def call(self, key: Hashable, values: Tensors, max_rows: int, run: Run) -> dict[str, torch.Tensor]:
        """``run(values)`` for this loop's ``values``, in one call with the other loops' calls of the same ``key``
        when they come within the wait; this loop's rows of the outputs."""
        mine = _Call(values)
        with self._cond:
            group = self._open.get(key)
            if group is not None and group.rows + mine.rows > max_rows:
                group.full = True  # it runs as it is; this call starts the next one
                del self._open[key]
                self._cond.notify_all()
                group = None
            if group is None:
                group = self._open[key] = _Group(deadline=time.monotonic() + self.max_wait)
            group.calls.append(mine)
            group.rows += mine.rows
            self._cond.notify_all()
            while mine.result is None and mine.error is None:
                if not group.taken and (group.full or len(group.calls) >= self._denoising
                                        or time.monotonic() >= group.deadline):
                    group.taken = True  # this loop sends the group's call
                    if self._open.get(key) is group:
                        del self._open[key]
                    break
                self._cond.wait(None if group.taken else max(0.0, group.deadline - time.monotonic()))
            else:
                return self._outcome(mine)
        self._run(group, run)
        return self._outcome(mine)

    def _run(self, group: _Group, run: Run) -> None:
        calls = group.calls
        try:
            merged = calls[0].values if len(calls) == 1 else [torch.cat(v) for v in zip(*(c.values for c in calls))]
            outputs = run(merged)
            offset = 0
            for call in calls:
                call.result = {name: value[offset:offset + call.rows] for name, value in outputs.items()}
                offset += call.rows
        except BaseException as exc:  # every loop of the group hears of it, in its own thread
            for call in calls:
                call.error = exc
        with self._cond:
            self._cond.notify_all()
        if self.on_merge is not None:
            self.on_merge(len(calls))

    @staticmethod
    def _outcome(call: _Call) -> dict[str, torch.Tensor]:
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result
