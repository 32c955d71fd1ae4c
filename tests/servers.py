"""Helpers for tests that talk to a real tritonserver over loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import collections
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def triton_on(repo: Path, logs: Path):
    """A real tritonserver on ``repo``, on free loopback ports, its log in the folder ``logs``."""
    from sdtrt.model_repository.serving.server import TritonServer

    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=Path(logs) / "tritonserver.log") as triton:
        yield triton


def _drain(proc: subprocess.Popen) -> collections.deque:
    """Keep reading the process's piped output (its last lines kept), so that a chatty server never blocks on a
    full pipe while a test talks to it."""
    tail = getattr(proc, "output_tail", None)
    if tail is None and proc.stdout is not None:
        tail = proc.output_tail = collections.deque(maxlen=400)
        proc.output_thread = threading.Thread(target=lambda: tail.extend(proc.stdout), daemon=True)
        proc.output_thread.start()
    return tail if tail is not None else collections.deque()


def first_answer(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> int:
    """The HTTP status of the first answer ``url`` gives (an error status included) while the process ``proc``
    that serves it starts; fails with the process's output if it exits or the time runs out. The output is read
    from then on (the last lines kept in ``proc.output_tail``)."""
    deadline = time.monotonic() + timeout
    tail = _drain(proc)
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait(10)
                time.sleep(0.5)  # the last lines through the drain
                raise AssertionError(f"{url} never answered: {''.join(tail)}") from None
            time.sleep(0.3)


def output_of(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """What a process gave on its piped output once it has exited (after first_answer: its last 400 lines)."""
    if getattr(proc, "output_tail", None) is None:
        return proc.communicate(timeout=timeout)[0]
    proc.wait(timeout)
    proc.output_thread.join(timeout)
    return "".join(proc.output_tail)


def status(url: str) -> int:
    """The HTTP status ``url`` answers (an error status included); 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def child_pid(parent: int, name: bytes) -> int | None:
    """The child process of ``parent`` whose command line holds ``name`` (e.g. sdtrt serve's tritonserver)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == parent and name in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
    return None


def answered(server, model: str) -> float:
    """How many requests the Triton server has answered for ``model`` (its own metrics): work that reached it."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(("nv_inference_request_success{", "nv_inference_request_failure{"))
               and f'model="{model}"' in line)


def raw_infer(server, fields: dict, protocol: str = "grpc", model: str = "txt2img"):
    """Send fields exactly as given (no client-side checks), the way curl or perf_analyzer would."""
    module, url = (grpcclient, server.url) if protocol == "grpc" else (httpclient, server.http_url)
    inputs = []
    for name, (value, wire) in fields.items():
        array = np.array([value.encode() if wire == "BYTES" else value],
                         dtype={"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32,
                                "BOOL": np.bool_}[wire])
        tensor = module.InferInput(name, [1], wire)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = module.InferenceServerClient(url)
    try:
        return client.infer(model, inputs)
    finally:
        client.close()  # an open HTTP connection would hold the server's shutdown for its exit timeout


def page_generates(url: str, tmp_path: Path, shot: bool = True) -> None:
    """The Gradio page (``sdtrt ui --url``) in headless Chromium: a prompt, 4 steps, 128x128, batch 2, seed 42,
    Generate; two pictures come back with their infotext and are saved as A1111 names them."""
    from playwright.sync_api import sync_playwright

    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "ui", "--url", url, "--port", str(port),
                             "--out", str(tmp_path / "outputs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert first_answer(f"http://127.0.0.1:{port}/", proc) == 200
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            prompt = page.get_by_label("Prompt", exact=True)
            prompt.wait_for(timeout=60000)
            prompt.fill("a lighthouse at dawn, oil painting")
            for label, value in (("Sampling steps", "4"), ("Width", "128"), ("Height", "128"), ("Batch size", "2")):
                box = page.get_by_label(f"number input for {label}")
                box.fill(value)
                box.press("Enter")
            page.get_by_label("Seed").fill("42")
            page.get_by_role("button", name="Generate").click()
            page.locator("button.thumbnail-item img").first.wait_for(timeout=120000)
            infotext = page.get_by_label("Generation parameters (A1111 infotext)")
            page.wait_for_function("el => el.value.includes('Steps: 4')", arg=infotext.element_handle(), timeout=30000)
            assert page.locator("button.thumbnail-item img").count() == 2
            text = infotext.input_value()
            assert "Seed: 42," in text and "Size: 128x128" in text
            page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
            if shot and os.environ.get("SDTRT_UPDATE_SCREENSHOT"):
                shutil.copy(tmp_path / "ui.png", Path(__file__).parents[1] / "docs" / "ui.png")
            browser.close()
        saved = sorted((tmp_path / "outputs" / "txt2img-images").iterdir())
        assert [p.name for p in saved] == ["00001-42.png", "00002-43.png"]
        with Image.open(saved[0]) as im:
            assert "Seed: 42," in im.info["parameters"]
    finally:
        proc.terminate()
        proc.wait(30)
