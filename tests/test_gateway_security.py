"""The A1111 gateway exposed, tried as an attacker and as a second user would, against the real `sdtrt api` over
HTTP in front of a real tritonserver: every route behind the credentials, each user's generations their own,
cross-site requests refused, and requests that ask for too much refused before any work, within a second, with
the gateway's memory unchanged."""

from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from servers import first_answer, free_ports
from sdtrt.client import Client
from sdtrt.client.apps.web_guard import OPEN_PATHS
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.pictures import base64_limit

USERS = {"alice": "alice-password-1", "bob": "bob-password-2"}


def auth(user: str | None) -> dict[str, str]:
    if user is None:
        return {}
    token = base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    """`sdtrt api` with two users' credentials, as a process of its own (its memory is measured)."""
    (port,) = free_ports(1)
    out = tmp_path_factory.mktemp("gateway")
    creds = out / "users.txt"
    creds.write_text("\n".join(f"{u}:{p}" for u, p in USERS.items()) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "api", "--url", server.url, "--port", str(port),
                             "--out", str(out), "--api-auth-path", str(creds)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    assert first_answer(f"{base}/sdapi/v1/samplers", proc) == 401
    yield base, proc
    proc.terminate()
    proc.wait(30)


def call(base: str, method: str, path: str, body=None, user: str | None = "alice", headers: dict | None = None,
         timeout: float = 300) -> tuple[int, dict | str, float]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **auth(user), **(headers or {})})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    seconds = time.perf_counter() - start
    try:
        return status, json.loads(text), seconds
    except json.JSONDecodeError:
        return status, text, seconds


# --- every route behind the credentials --------------------------------------------------------------------------

def test_every_route_wants_the_credentials_docs_and_schema_included(server):
    app = create_app(Client(server.url), None, USERS)
    paths = {(route.path, method) for route in app.routes for method in getattr(route, "methods", None) or {"GET"}}
    assert {("/docs", "GET"), ("/openapi.json", "GET"), ("/sdapi/v1/txt2img", "POST")} <= paths
    paths |= {("/no/such/route", "GET"), ("/sdapi/v1/interrupt", "PUT")}
    paths -= {(path, "GET") for path in OPEN_PATHS}  # /healthz: ready or not, for Kubernetes' probes
    assert OPEN_PATHS == {"/healthz"}
    client = TestClient(app)
    wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}
    for path, method in sorted(paths):
        path = path.replace("{", "").replace("}", "")
        for headers in ({}, wrong, {"Authorization": "Bearer x"}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.status_code)
            assert response.headers["www-authenticate"].startswith("Basic")
    assert client.get("/docs", headers=auth("alice")).status_code == 200
    assert client.get("/openapi.json", headers=auth("bob")).status_code == 200


def test_a_non_loopback_host_without_credentials_is_refused_unless_said_explicitly(server):
    for command in ("api", "ui"):
        done = subprocess.run([sys.executable, "-m", "sdtrt", command, "--url", server.url, "--host", "0.0.0.0",
                               "--port", str(free_ports(1)[0])], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "without credentials" in done.stderr and "--allow-unauthenticated" in done.stderr
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "api", "--url", server.url, "--host", "0.0.0.0",
                             "--port", str(port), "--allow-unauthenticated"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert first_answer(f"http://127.0.0.1:{port}/sdapi/v1/samplers", proc) == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_state_changing_cross_site_requests_are_refused(gateway):
    base, _ = gateway
    port = base.rsplit(":", 1)[1]
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site", "Origin": f"http://127.0.0.1:{port}"}):
        for path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/options"):
            status, answer, _ = call(base, "POST", path, {} if path.endswith("options") else None, headers=headers)
            assert status == 403, (path, headers, status)
            assert "cross-site" in answer["detail"]
    # the gateway's own origin and programs that send no browser headers (webuiapi, curl) pass
    assert call(base, "POST", "/sdapi/v1/interrupt", headers={"Origin": f"http://127.0.0.1:{port}",
                                                              "Sec-Fetch-Site": "same-origin"})[0] == 200
    assert call(base, "POST", "/sdapi/v1/interrupt")[0] == 200
    assert call(base, "GET", "/sdapi/v1/progress", headers={"Sec-Fetch-Site": "cross-site"})[0] == 200  # reads pass


# --- each user's generations are theirs --------------------------------------------------------------------------

def test_users_see_and_stop_only_their_own_generations(gateway):
    base, _ = gateway
    outcome: dict = {}

    def alice_generates() -> None:
        outcome["alice"] = call(base, "POST", "/sdapi/v1/txt2img",
                                {"prompt": "a long one", "steps": 150, "width": 512, "height": 512, "seed": 7,
                                 "n_iter": 3, "force_task_id": "task(alice-1)"}, user="alice")

    worker = threading.Thread(target=alice_generates)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, mine, _ = call(base, "GET", "/sdapi/v1/progress?skip_current_image=true", user="alice")
        if mine["state"]["sampling_step"] > 0:
            break
        time.sleep(0.2)
    assert mine["state"]["job"] == "txt2img" and mine["state"]["sampling_step"] > 0
    # bob sees nothing of it, by default or by its task id, and cannot stop it
    _, theirs, _ = call(base, "GET", "/sdapi/v1/progress", user="bob")
    assert theirs["state"]["job"] == "" and theirs["progress"] == 0 and theirs["current_image"] is None
    _, theirs, _ = call(base, "GET", "/sdapi/v1/progress?id_task=task(alice-1)", user="bob")
    assert theirs["state"]["job"] == ""
    assert call(base, "POST", "/sdapi/v1/interrupt", user="bob")[0] == 200
    assert call(base, "POST", "/sdapi/v1/skip", user="bob")[0] == 200
    before = mine["state"]["sampling_step"]
    time.sleep(1.5)
    _, mine, _ = call(base, "GET", "/sdapi/v1/progress?id_task=task(alice-1)&skip_current_image=true", user="alice")
    assert mine["state"]["job"] == "txt2img" and not mine["state"]["interrupted"]
    assert (mine["state"]["job_no"], mine["state"]["sampling_step"]) > (0, before), "bob's interrupt stopped it"
    assert worker.is_alive()
    # bob's options are his own too
    assert call(base, "POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2}, user="bob")[0] == 200
    assert call(base, "GET", "/sdapi/v1/options", user="alice")[1]["CLIP_stop_at_last_layers"] == 1
    assert call(base, "GET", "/sdapi/v1/options", user="bob")[1]["CLIP_stop_at_last_layers"] == 2
    # alice stops her own
    assert call(base, "POST", "/sdapi/v1/interrupt", user="alice")[0] == 200
    worker.join(60)
    status, answer, seconds = outcome["alice"]
    assert status == 200 and seconds < 40, (status, seconds)


# --- bounded work ------------------------------------------------------------------------------------------------

def png_b64(width: int, height: int, text: str | None = None) -> str:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def header_bomb_b64(width: int, height: int) -> str:
    """A PNG whose header claims ``width`` x ``height`` pixels, with a few bytes of data: Pillow would allocate
    the whole picture to decode it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    return base64.b64encode(data).decode()


def other_format_b64(fmt: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


OVERSIZED = {
    "n_iter": ("/sdapi/v1/txt2img", {"prompt": "x", "n_iter": 100_000_000}, "n_iter"),
    "prompt": ("/sdapi/v1/txt2img", {"prompt": "a (red:1.1) [circle|square] " * 40_000, "steps": 2}, "prompt"),
    "infotext": ("/sdapi/v1/txt2img", {"infotext": "a a a a " * 200_000}, "infotext"),
    "styles": ("/sdapi/v1/txt2img", {"prompt": "x", "styles": ["s"] * 10_000}, "styles"),
    # (with crop the same request is served in bounded memory: tests/test_upscale_limits.py)
    "upscale": ("/sdapi/v1/extra-single-image", {"image": png_b64(64, 8192), "resize_mode": 1, "upscaling_crop": False,
                                                  "upscaling_resize_w": 8192, "upscaling_resize_h": 8192,
                                                  "upscaler_1": "Lanczos"}, "upscaling_resize"),
    "upscale_by": ("/sdapi/v1/extra-single-image", {"image": png_b64(4096, 4096), "upscaling_resize": 8,
                                                     "upscaler_1": "Lanczos"}, "upscaling_resize"),
    "bomb": ("/sdapi/v1/png-info", {"image": header_bomb_b64(60_000, 60_000)}, "image"),
    "bomb_img2img": ("/sdapi/v1/img2img", {"init_images": [header_bomb_b64(20_000, 20_000)], "steps": 2}, "init_images"),
    "tiff": ("/sdapi/v1/png-info", {"image": other_format_b64("TIFF")}, "image"),
    "bmp": ("/sdapi/v1/img2img", {"init_images": [other_format_b64("BMP")], "steps": 2}, "init_images"),
    "init_images": ("/sdapi/v1/img2img", {"init_images": [png_b64(8, 8)] * 5000, "batch_size": 1, "steps": 2},
                    "init_images"),
    "base64": ("/sdapi/v1/png-info", {"image": "A" * (base64_limit() + 1)}, "image"),
    "task_id": ("/sdapi/v1/txt2img", {"prompt": "x", "force_task_id": "t" * 100_000}, "force_task_id"),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED))
def test_a_request_that_asks_too_much_is_refused_at_once_naming_the_field(gateway, case):
    base, proc = gateway
    path, body, field = OVERSIZED[case]
    before = rss_mib(proc.pid)
    status, answer, seconds = call(base, "POST", path, body)
    assert status == 422, (case, status, str(answer)[:500])
    assert seconds < 5.0, (case, seconds)  # what each asks for would take minutes or gigabytes
    named = [".".join(map(str, d["loc"])) for d in answer["detail"]] if isinstance(answer["detail"], list) else []
    assert any(field in loc for loc in named), (case, str(answer)[:500])
    assert rss_mib(proc.pid) - before < 100, (case, before, rss_mib(proc.pid))
    assert call(base, "GET", "/sdapi/v1/samplers")[0] == 200  # still serving


def test_a_body_over_the_limit_is_refused_before_it_is_read(gateway):
    base, proc = gateway
    host, port = base.removeprefix("http://").split(":")
    before = rss_mib(proc.pid)
    # declared: answered on the headers alone
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/sdapi/v1/txt2img")
    for key, value in {**auth("alice"), "Content-Type": "application/json", "Content-Length": str(2**31)}.items():
        connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413  # answered although the body was never sent: it was not waited for
    assert "larger than 64 MiB" in json.loads(response.read())["detail"]
    connection.close()
    # chunked, no length: counted while it arrives
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    block = b'{"prompt": "' + b"x" * (2**20)
    def chunks():
        for _ in range(100):
            yield block
    connection.request("POST", "/sdapi/v1/txt2img", body=chunks(), encode_chunked=True,
                       headers={**auth("alice"), "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 413
    connection.close()
    assert rss_mib(proc.pid) - before < 150
    assert call(base, "GET", "/sdapi/v1/samplers")[0] == 200


def test_nothing_internal_leaks_paths_addresses_or_exception_text(gateway, server):
    base, _ = gateway
    _, models, _ = call(base, "GET", "/sdapi/v1/sd-models")
    assert models and all("/" not in m["filename"] for m in models)
    _, flags, _ = call(base, "GET", "/sdapi/v1/cmd-flags")
    text = json.dumps(flags)
    assert server.url not in text and "://" not in text and str(Path.cwd()) not in text
    # an unexpected failure: the client gets an id, not the exception's text
    app = create_app(Client(server.url), None, USERS)

    @app.get("/sdapi/v1/fail-for-test")
    def fail():
        raise RuntimeError("secret internal detail at /srv/models/private.safetensors")

    response = TestClient(app, raise_server_exceptions=False).get("/sdapi/v1/fail-for-test", headers=auth("alice"))
    assert response.status_code == 500
    assert "secret" not in response.text and "/srv" not in response.text and "internal error" in response.text


# --- Triton's own entry points hold the limits too ---------------------------------------------------------------

def test_the_networks_refuse_shapes_outside_the_spec_when_called_directly(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from sdtrt.contract.spec import load_spec

    spec = load_spec(server.model_repository)
    unet = spec.component("unet")
    latent = [t for t in unet.inputs if len(t.shape) == 4][0]
    too_big = spec.dims[latent.shape[2]].max + 8
    inputs = []
    for tensor in unet.inputs:
        shape = [1 if i == 0 else (d if isinstance(d, int) else (too_big if tensor is latent and i >= 2 else
                                                                 spec.dims[d].min)) for i, d in enumerate(tensor.shape)]
        if len(tensor.shape) == 1:
            shape = [1, 1]
        wire = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32"}[tensor.dtype]
        item = grpcclient.InferInput(tensor.name, shape, wire)
        item.set_data_from_numpy(np.zeros(shape, dtype=tensor.dtype))
        inputs.append(item)
    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException, match=f"{latent.name}.*from .* to {too_big - 8}"):
        client.infer(spec.triton_name("unet"), inputs)
    assert client.is_model_ready(spec.triton_name("unet"))


def test_the_progress_model_refuses_a_preview_larger_than_any_loop_posts(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from sdtrt.contract.spec import PROGRESS, PROGRESS_PREVIEW, PROGRESS_REQUEST_ID, PROGRESS_STEP, PROGRESS_TOTAL

    def tensor(name, array, wire):
        item = grpcclient.InferInput(name, list(array.shape), wire)
        item.set_data_from_numpy(array)
        return item

    inputs = [tensor(PROGRESS_REQUEST_ID, np.array([b"probe"], dtype=np.object_), "BYTES"),
              tensor(PROGRESS_STEP, np.array([1], np.int32), "INT32"),
              tensor(PROGRESS_TOTAL, np.array([2], np.int32), "INT32"),
              tensor(PROGRESS_PREVIEW, np.zeros((2048, 1024, 3), np.uint8), "UINT8")]
    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException, match="preview"):
        client.infer(PROGRESS, inputs)


def test_img2img_refuses_an_init_image_of_more_pixels_than_any_picture_it_takes(server):
    from servers import raw_infer  # noqa: F401  (the same raw path: no client-side checks)
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from sdtrt.contract.pictures import MAX_PICTURE_PIXELS

    picture = np.zeros((MAX_PICTURE_PIXELS // 4096 + 1, 4096, 3), np.uint8)
    item = grpcclient.InferInput("init_image", list(picture.shape), "UINT8")
    item.set_data_from_numpy(picture)
    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException, match="init_image.*pixels"):
        client.infer("img2img", [item])
    assert client.is_model_ready("img2img")
