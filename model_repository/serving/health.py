"""Keeping a served repository honest and alive (``sdtrt serve`` runs this beside tritonserver).

Triton's Python backend does not restart a stub process that died (killed, out of memory), and Triton 2.51 keeps
answering ready while every request to that model fails ("Stub process 'unet_0_0' is not healthy"). The healer
watches the server's stub processes; when one dies it unloads and reloads that model through Triton's model
control API, so readiness (``--strict-readiness``) is false from the unload until the model is back and the
stub is a new one; when that fails, or tritonserver itself exits, it restarts the server.

A stub that hangs without dying is a fault too (the watchdog): a stub stopped by a signal (state T) is hung at
once; otherwise every model gets a tiny probe request every ``probe_interval`` (model_repository/probes.py), and
one that has not answered within ``probe_timeout`` while Triton's count of its executions stood still is hung
(a model busy with long calls still completes them). A job model whose loops are all busy is judged by the stop
signal alone: its probe would wait behind its generations. A hung model's stubs are killed, which fails the
requests it holds (the job models answer them UNAVAILABLE, naming the stage), and it is reloaded like a dead one;
readiness is false from the kill until it is back. Each event is one JSON log line (logger ``sdtrt.health``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from sdtrt.contract.prometheus import samples, scrape
from sdtrt.contract.spec import IMG2IMG, TXT2IMG, load_catalog
from sdtrt.model_repository.configs import LOOPS_PARAMETER
from sdtrt.model_repository.probes import PROBE_ID, probes

log = logging.getLogger("sdtrt.health")

STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    model: str
    instance: str  # Triton's instance name, <model>_<group>_<index>
    pid: int


def is_stopped(pid: int) -> bool:
    """A process stopped by a signal (SIGSTOP, SIGTSTP) or a tracer: it will not answer until continued."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


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
    """Watches one ``TritonServer`` (see the module docstring). ``on_event`` sees every logged event.

    ``probe_timeout`` must exceed the longest single call of any network (a full-size U-Net call at the largest
    size and batch on a CPU takes tens of seconds); a hung stub is healed within about ``probe_interval`` +
    ``probe_timeout`` + the model's load time. ``probe_interval`` 0 turns the probes off."""

    def __init__(self, server, interval: float = 0.5, load_timeout: float = 300.0,
                 on_event: Callable[[dict], None] | None = None, probe_interval: float = 5.0,
                 probe_timeout: float = 20.0, detect_stopped: bool = True):
        self.server = server
        self.interval = interval
        self.load_timeout = load_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.detect_stopped = detect_stopped  # (off: only the probes judge, as for a stub hung in a deadlock)
        self.on_event = on_event or (lambda record: None)
        self.failed = threading.Event()  # set when the server could not be brought back
        self.healing = threading.Event()  # set while a model is being brought back (readiness is false then)
        self.last_check = time.monotonic()  # when the watcher last finished a check (sdtrt serve's liveness)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._known: dict[str, Stub] = {}
        self._stopped_seen: dict[int, int] = {}  # pid -> consecutive checks it was seen stopped
        self._probes: dict[str, list] = {}
        self._probing: dict[str, tuple[float, Future, dict[str, float]]] = {}
        self._last_probe = 0.0
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="sdtrt-probe")
        self._loops: dict[str, int] = {}

    def start(self) -> "Healer":
        self._known = stub_processes(self.server.process.pid)
        self._load_probes()
        self._thread = threading.Thread(target=self._run, name="sdtrt-healer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _event(self, event: str, **fields) -> None:
        self.on_event(emit(event, **fields))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
                if self.probe_interval > 0:
                    self.watch()
            except Exception as exc:  # the watcher must outlive anything it watches
                self._event("healer_error", error=repr(exc))
            self.last_check = time.monotonic()

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
        if self.detect_stopped:
            self._check_stopped(current)

    # --- the watchdog -----------------------------------------------------------------------------------------
    def _check_stopped(self, current: dict[str, Stub]) -> None:
        """A stub seen stopped at two checks in a row is hung (one sighting could be a debugger's blink)."""
        seen = {}
        for stub in current.values():
            if is_stopped(stub.pid):
                seen[stub.pid] = self._stopped_seen.get(stub.pid, 0) + 1
                if seen[stub.pid] >= 2:
                    self.heal_hung(stub.model, "stopped")
                    return
        self._stopped_seen = seen

    def _load_probes(self) -> None:
        try:
            self._probes = probes(load_catalog(self.server.model_repository))
        except Exception as exc:  # a repository being rewritten: probe what we knew
            self._event("probes_not_loaded", error=str(exc)[:300])
        for job in (TXT2IMG, IMG2IMG):
            self._loops[job] = self._job_loops(job)

    def _job_loops(self, job: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.server.http_url}/v2/models/{job}/config", timeout=5) as r:
                config = json.loads(r.read())
            return int(config.get("parameters", {}).get(LOOPS_PARAMETER, {}).get("string_value", 1))
        except (OSError, ValueError):
            return 1

    def _metrics(self) -> dict[tuple[str, str], float]:
        """(metric, model or job) -> value, for the series the watchdog reads; {} when unreadable."""
        try:
            text = scrape(self.server.metrics_url, timeout=5)
        except (OSError, TypeError):
            return {}
        values: dict[tuple[str, str], float] = {}
        for name, labels, value in samples(text):
            if name in ("nv_inference_exec_count", "sdtrt_requests_running"):
                found = re.search(r'(?:model|job)="([^"]*)"', labels)
                if found:
                    values[(name, found.group(1))] = values.get((name, found.group(1)), 0.0) + value
        return values

    def _probe(self, model: str, inputs: list) -> str | None:
        """Send one probe; the error that says the model's stub is unusable, or None for an answer."""
        body = json.dumps({"id": PROBE_ID, "inputs": inputs}).encode()
        request = urllib.request.Request(f"http://{self.server.http_url}/v2/models/{model}/infer", data=body,
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.probe_timeout + 30):
                return None
        except urllib.error.HTTPError as exc:  # an answer (the job models refuse steps=0 on purpose) ...
            text = exc.read().decode(errors="replace")
            if "Stub process" in text and "not healthy" in text:  # ... unless Triton gave up on the stub
                return text[:300]
            return None

    def watch(self) -> None:
        """Start a round of probes every probe_interval; judge those still unanswered after probe_timeout."""
        now = time.monotonic()
        for model, (started, future, before) in list(self._probing.items()):
            if future.done():
                del self._probing[model]
                unhealthy = None if future.exception() else future.result()
                if unhealthy:  # Triton's backend noticed a stub that stopped answering its health checks
                    self.heal_hung(model, f"Triton says: {unhealthy}")
                    return
            elif now - started > self.probe_timeout:
                del self._probing[model]
                self._judge(model, now - started, before)
                return  # one heal per check; the rest are judged again next round
        if now - self._last_probe < self.probe_interval:
            return
        self._last_probe = now
        ready = self._ready_models()
        metrics = self._metrics() if ready else {}
        for model, inputs in self._probes.items():
            if model in self._probing or model not in ready:
                continue
            if model in self._loops and metrics.get(("sdtrt_requests_running", model), 0) >= self._loops[model]:
                continue  # every loop busy: the probe would wait behind generations (the stop check covers it)
            self._probing[model] = (now, self._pool.submit(self._probe, model, inputs), metrics)

    def _ready_models(self) -> set[str]:
        try:
            return {m["name"] for m in json.loads(self._post("/v2/repository/index", timeout=5))
                    if m.get("state") == "READY"}
        except (OSError, ValueError):
            return set()

    def _judge(self, model: str, waited: float, before: dict[tuple[str, str], float]) -> None:
        after = self._metrics()
        if not after:
            return  # no metrics: the whole server is slow or gone (check() sees a dead one)
        key = ("nv_inference_exec_count", model)
        if after.get(key, 0.0) != before.get(key, 0.0):
            return  # it completed work while the probe waited: busy, not hung
        if model in self._loops and after.get(("sdtrt_requests_running", model), 0) >= self._loops[model]:
            return  # its loops filled up while the probe waited
        self.heal_hung(model, f"no answer to a probe in {waited:.0f} s")

    def heal_hung(self, model: str, why: str) -> None:
        """Kill a hung model's stubs (failing what they hold) and reload it; readiness is false meanwhile."""
        process = self.server.process
        current = stub_processes(process.pid) if process else {}
        stubs = [s for s in current.values() if s.model == model]
        # A probe can reach a stub that died before check() saw it go (check() waits on Triton's answer): that
        # is a death, and is reported as one.
        gone = [s for s in self._known.values() if s.model == model and s.instance not in current]
        if gone:
            self._event("stub_died", model=model, instances=[s.instance for s in gone], pids=[s.pid for s in gone],
                        noticed=why)
        else:
            self._event("model_hung", model=model, reason=why, pids=[s.pid for s in stubs])
        self.healing.set()
        try:
            for stub in stubs:
                try:
                    os.kill(stub.pid, signal.SIGKILL)  # works on a stopped process too
                except ProcessLookupError:
                    pass
            if not self.reload(model):
                self.restart()
        finally:
            self.healing.clear()
        self._stopped_seen = {}
        self._probing.pop(model, None)
        if self.server.process is not None:
            self._known = stub_processes(self.server.process.pid)

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

    def _post(self, path: str, timeout: float) -> bytes:
        """A POST to Triton's repository API (restricted: it carries the control key); the answer's body."""
        request = urllib.request.Request(f"http://{self.server.http_url}{path}", data=b"{}", method="POST",
                                         headers=self.server.control_key.headers())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def reload(self, model: str) -> bool:
        """Unload (readiness goes false) and load again (new stubs); True when the model is back."""
        start = time.monotonic()
        self.healing.set()
        try:
            self._post(f"/v2/repository/models/{model}/unload", timeout=60)
            self._post(f"/v2/repository/models/{model}/load", timeout=self.load_timeout)
        except (urllib.error.URLError, OSError) as exc:
            self._event("reload_failed", model=model, error=str(exc)[:300])
            return False
        finally:
            self.healing.clear()
        self._event("model_reloaded", model=model, seconds=round(time.monotonic() - start, 2))
        return True

    def restart(self) -> None:
        start = time.monotonic()
        self.healing.set()
        try:
            self.server.stop()
            self.server.start(timeout=self.load_timeout)
        except Exception as exc:
            self._event("restart_failed", error=str(exc)[:300])
            self.failed.set()
            self._stop.set()
            return
        finally:
            self.healing.clear()
        self._known = stub_processes(self.server.process.pid)
        self._probing.clear()
        self._load_probes()
        self._event("server_restarted", seconds=round(time.monotonic() - start, 2), pid=self.server.process.pid)


def stubs_of(server_pid: int, model: str) -> list[Stub]:
    """The live stubs of one model (for operators and tests: which process to look at, or to kill)."""
    return [s for s in stub_processes(server_pid).values() if s.model == model]


class HealthEndpoint:
    """`sdtrt serve`'s own health port, for Kubernetes' probes: ``/livez`` is 200 while the watcher runs (it
    checked within ``stuck_after`` seconds, or is healing within its load timeout, and has not given up): a
    tritonserver being restarted or a model being reloaded is not a reason to kill the pod, a stuck supervisor is. ``/readyz`` is 200 when tritonserver says
    ready and nothing is being healed. Nothing else is served, and nothing secret: any prober may reach it."""

    def __init__(self, healer: Healer, host: str, port: int, stuck_after: float = 60.0):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                status = outer.status(self.path.split("?", 1)[0])
                body = json.dumps({"status": "ok" if status == 200 else "unavailable"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every few seconds: not worth a log line each
                pass

        self.healer = healer
        self.stuck_after = stuck_after
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="sdtrt-health", daemon=True)

    def status(self, path: str) -> int:
        healer = self.healer
        if path == "/livez":
            # A heal (a reload, a restart) holds the watcher for up to its load timeout: alive, not stuck.
            allowed = self.stuck_after + (healer.load_timeout if healer.healing.is_set() else 0.0)
            stuck = time.monotonic() - healer.last_check > allowed
            return 503 if healer.failed.is_set() or stuck else 200
        if path == "/readyz":
            return 200 if not healer.healing.is_set() and healer.server.is_ready() else 503
        return 404

    def start(self) -> "HealthEndpoint":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # (shutdown waits for a serve_forever that never started)
            self.httpd.shutdown()
        self.httpd.server_close()
