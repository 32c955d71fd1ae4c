"""Keeping a served repository honest and alive (``sdtrt serve`` runs this beside tritonserver).

Triton's Python backend does not restart a stub process that died (killed, out of memory), and Triton 2.51 keeps
answering ready while every request to that model fails ("Stub process 'unet_0_0' is not healthy"). The healer
watches the server's stub processes; when one dies it unloads and reloads that model through Triton's model
control API, so readiness (``--strict-readiness``) is false from the unload until the model is back and the
stub is a new one; when that fails, or tritonserver itself exits, it restarts the server. Liveness
(``/v2/health/live``) stays Triton's own. Each event is one JSON log line (logger ``sdtrt.health``).

A stub that hangs without dying is not detected here.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("sdtrt.health")

STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    model: str
    instance: str  # Triton's instance name, <model>_<group>_<index>
    pid: int


def stub_processes(server_pid: int) -> dict[str, Stub]:
    """The live Python-backend stubs the server started (they share its process group), by instance name.

    A stub's command line holds its model file (<repo>/<model>/<version>/model.py) and its instance name."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if not argv[0].endswith(STUB) or state[0] == "Z" or int(state[2]) != server_pid:
                continue  # another process, a zombie, or another server's stub (field 5 of stat: pgrp)
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
        model = Path(argv[1]).parent.parent.name
        instance = next((a for a in argv if re.fullmatch(re.escape(model) + r"_\d+_\d+", a)), None)
        if instance:
            stubs[instance] = Stub(model, instance, int(entry.name))
    return stubs


def emit(event: str, **fields) -> dict:
    record = {"event": event, "ts": round(time.time(), 3), **fields}
    log.warning(json.dumps(record))
    return record


class Healer:
    """Watches one ``TritonServer`` (see the module docstring). ``on_event`` sees every logged event."""

    def __init__(self, server, interval: float = 0.5, load_timeout: float = 300.0,
                 on_event: Callable[[dict], None] | None = None):
        self.server = server
        self.interval = interval
        self.load_timeout = load_timeout
        self.on_event = on_event or (lambda record: None)
        self.failed = threading.Event()  # set when the server could not be brought back
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known: dict[str, Stub] = {}

    def start(self) -> "Healer":
        self._known = stub_processes(self.server.process.pid)
        self._thread = threading.Thread(target=self._run, name="sdtrt-healer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _event(self, event: str, **fields) -> None:
        self.on_event(emit(event, **fields))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # the watcher must outlive anything it watches
                self._event("healer_error", error=repr(exc))

    def check(self) -> None:
        process = self.server.process
        if process is None or process.poll() is not None:
            self._event("server_died", exit_code=None if process is None else process.returncode)
            self.restart()
            return
        current = stub_processes(process.pid)
        dead: dict[str, list[Stub]] = {}
        for instance, stub in self._known.items():
            # Gone, not replaced: Triton starts a new stub of an instance only when it (re)loads the model
            # (`sdtrt models load`), never after a crash.
            if instance not in current:
                dead.setdefault(stub.model, []).append(stub)
        undecided: dict[str, Stub] = {}
        for model, stubs in dead.items():
            ready = self._ready(model)
            if ready is None:  # Triton did not answer in time (a loaded machine): ask again at the next check
                undecided.update((s.instance, s) for s in stubs)
                continue
            if not ready:  # unloaded on purpose (`sdtrt models unload`), or loading: not a death
                continue
            self._event("stub_died", model=model, instances=[s.instance for s in stubs], pids=[s.pid for s in stubs])
            if not self.reload(model):
                self.restart()
                return
        # What runs now is what to watch: stubs of models loaded since, not those of models unloaded.
        self._known = {**(stub_processes(process.pid) if dead else {**self._known, **current}), **undecided}

    def _ready(self, model: str) -> bool | None:
        """Triton's own word on a model: a model whose stub died still says ready (the bug this heals); an
        unloaded one says not ready (HTTP 400). No answer (timeout, refused) is None: not a decision."""
        try:
            with urllib.request.urlopen(f"http://{self.server.http_url}/v2/models/{model}/ready", timeout=5):
                return True
        except urllib.error.HTTPError:
            return False
        except (urllib.error.URLError, OSError):
            return None

    def _post(self, path: str, timeout: float) -> None:
        request = urllib.request.Request(f"http://{self.server.http_url}{path}", data=b"{}", method="POST",
                                         headers=self.server.control_key.headers())  # model control is restricted
        with urllib.request.urlopen(request, timeout=timeout):
            pass

    def reload(self, model: str) -> bool:
        """Unload (readiness goes false) and load again (new stubs); True when the model is back."""
        start = time.monotonic()
        try:
            self._post(f"/v2/repository/models/{model}/unload", timeout=60)
            self._post(f"/v2/repository/models/{model}/load", timeout=self.load_timeout)
        except (urllib.error.URLError, OSError) as exc:
            self._event("reload_failed", model=model, error=str(exc)[:300])
            return False
        self._event("model_reloaded", model=model, seconds=round(time.monotonic() - start, 2))
        return True

    def restart(self) -> None:
        start = time.monotonic()
        try:
            self.server.stop()
            self.server.start(timeout=self.load_timeout)
        except Exception as exc:
            self._event("restart_failed", error=str(exc)[:300])
            self.failed.set()
            self._stop.set()
            return
        self._known = stub_processes(self.server.process.pid)
        self._event("server_restarted", seconds=round(time.monotonic() - start, 2), pid=self.server.process.pid)


def stubs_of(server_pid: int, model: str) -> list[Stub]:
    """The live stubs of one model (for operators and tests: which process to look at, or to kill)."""
    return [s for s in stub_processes(server_pid).values() if s.model == model]
