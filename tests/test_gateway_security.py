"""The A1111 gateway exposed, tried as an attacker and as a second user would, against the real `sdtrt api` over
HTTP in front of a real tritonserver: every route behind the credentials, each user's generations their own,
cross-site requests refused, and requests that ask for too much refused before any work, within a second, with
the gateway's memory unchanged."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import re
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
from sdtrt.contract.errors import ERROR_KINDS
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
    # What each asks for would take minutes or gigabytes; the refusals take milliseconds, but for the base64 case's
    # 43 MB arriving and being parsed (0.25 s here, measured: the slowest case)
    assert seconds < 1.0, (case, seconds)
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


TXT2IMG = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 5}


def client_that_lost_its_server(server, address: str | None = None, protocol: str = "grpc") -> Client:
    """A client that read the server's models, then lost the server: its requests go to ``address`` (default: a
    port nothing listens on, as when the server went down)."""
    client = Client(server.url if protocol == "grpc" else server.http_url, protocol)
    assert client.catalog.models
    client.close()  # its connection to the real server: an open HTTP one holds tritonserver's shutdown for 30 s
    client.url = address or f"127.0.0.1:{free_ports(1)[0]}"
    return client


def internals(text: str, *more: str) -> list[str]:
    """What of the server side an answer shows: addresses, hosts, paths, the client's or Python's own words."""
    words = ("127.0.0.1", "localhost", ":800", "://", "(grpc)", "(http)", "Traceback", "InferenceServerException",
             "StatusCode", "failed to connect", "Not Allowed", "/tmp/", str(Path.cwd()), *more)
    return [word for word in words if word in text]


def test_nothing_internal_leaks_paths_addresses_or_exception_text(gateway, server, caplog):
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
    # the server gone: the client's words name its address; the user is told what to do and an id, the log the rest
    lost = client_that_lost_its_server(server)
    with caplog.at_level(logging.ERROR, logger="sdtrt.gateway"):
        response = TestClient(create_app(lost, None, USERS), raise_server_exceptions=False).post(
            "/sdapi/v1/txt2img", json=TXT2IMG, headers=auth("alice"))
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0, response.text
    assert internals(response.text, lost.url, lost.url.rsplit(":", 1)[1]) == [], response.text
    assert "busy or restarting" in response.text
    error_id = re.search(r"error ([0-9a-f]{12})", response.text).group(1)
    assert any(error_id in r.getMessage() and lost.url in r.getMessage() for r in caplog.records), caplog.text


FULL_DISK = """import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
runpy.run_module("sdtrt", run_name="__main__")
"""


def answer_with_a_full_disk(server, out: Path) -> tuple[int, str, dict]:
    """`sdtrt api` whose writes past 1 kB fail as on a full disk (RLIMIT_FSIZE: no root, no mount), asked for a
    picture it saves."""
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-c", FULL_DISK, "api", "--url", server.url, "--port", str(port),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert first_answer(f"http://127.0.0.1:{port}/sdapi/v1/samplers", proc) == 200
        status, answer, _ = call(f"http://127.0.0.1:{port}", "POST", "/sdapi/v1/txt2img",
                                 {**TXT2IMG, "width": 128, "height": 128, "save_images": True}, user=None)
    finally:
        proc.terminate()
        proc.wait(30)
    return status, json.dumps(answer), {}


def answer_when_interrupted(base: str) -> tuple[int, str, dict]:
    """A generation interrupted (A1111's Interrupt) once under way: the gateway's client cancels its request."""
    box: dict = {}
    body = {"prompt": "a long one", "steps": 150, "width": 256, "height": 256, "force_task_id": "task(cancelled)"}
    worker = threading.Thread(target=lambda: box.update(answer=call(base, "POST", "/sdapi/v1/txt2img", body)))
    worker.start()
    deadline = time.monotonic() + 60
    while call(base, "GET", "/sdapi/v1/progress?id_task=task(cancelled)")[1]["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.1)
    assert call(base, "POST", "/sdapi/v1/interrupt")[0] == 200
    worker.join(60)
    status, answer, _ = box["answer"]
    return status, json.dumps({k: v for k, v in answer.items() if k != "images"}), {}  # (base64 has any text)


def answer_over(client: Client, body: dict) -> tuple[int, str, dict]:
    response = TestClient(create_app(client, None, USERS), raise_server_exceptions=False).post(
        "/sdapi/v1/txt2img", json=body, headers=auth("alice"))
    return response.status_code, response.text, response.headers


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
def test_each_kind_of_error_is_answered_with_its_status_from_the_table_and_nothing_internal(kind, server, gateway,
                                                                                            tmp_path):
    """Each row of ERROR_KINDS made to happen for real at the gateway: a refused field, the server gone, a server
    that answers but not as Triton (Triton's metrics port, over HTTP), a full disk, an interrupt."""
    if kind == "InvalidRequest":
        status, text, headers = answer_over(Client(server.url), {**TXT2IMG, "steps": 10**6})
    elif kind == "Unavailable":
        lost = client_that_lost_its_server(server)
        status, text, headers = answer_over(lost, TXT2IMG)
        assert int(headers["retry-after"]) > 0 and lost.url.rsplit(":", 1)[1] not in text
    elif kind == "other":
        status, text, headers = answer_over(
            client_that_lost_its_server(server, f"127.0.0.1:{server.metrics_port}", "http"), TXT2IMG)
    elif kind == "DiskFull":
        status, text, headers = answer_with_a_full_disk(server, tmp_path)
        assert "bytes needed" in text and str(tmp_path) not in text
    else:
        assert kind == "Cancelled", f"no way to make a {kind} error here: add one"
        status, text, headers = answer_when_interrupted(gateway[0])
    # (Cancelled: no error at the gateway, whose own clients interrupt instead: A1111's 200 with the batches done)
    assert status == (ERROR_KINDS[kind]["gateway"] or 200), (kind, status, text)
    assert internals(text) == [], (kind, text)


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


def test_the_tokenizer_refuses_more_characters_than_both_prompts_hold_when_called_directly(server):
    """An outside caller of the tokenizer skips the job model's checks: it holds the prompts' character limit
    itself (a long text would cost tokenizing time and memory before any chunk limit is met)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from sdtrt.contract.spec import load_spec

    spec = load_spec(server.model_repository)
    name = spec.triton_name("tokenizer")
    limit = spec.field("prompt").max_length + spec.field("negative_prompt").max_length
    client = grpcclient.InferenceServerClient(server.url)
    served = {t["name"] for t in client.get_model_metadata(name, as_json=True)["inputs"]}
    assert {"piece_texts", "piece_weights", "negative_pieces"} <= served  # the names an outside caller reads

    def tokenize(text: str):
        def tensor(input_name, array, wire):
            item = grpcclient.InferInput(input_name, list(array.shape), wire)
            item.set_data_from_numpy(array)
            return item

        return client.infer(name, [tensor("piece_texts", np.array([text.encode()], dtype=np.object_), "BYTES"),
                                   tensor("piece_weights", np.array([1.0], np.float32), "FP32"),
                                   tensor("negative_pieces", np.array([0], np.int32), "INT32")])

    with pytest.raises(InferenceServerException) as refused:
        tokenize("a" * (limit + 1))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value
    assert refused.value.message().startswith("invalid piece_texts="), refused.value.message()
    assert f"at most {limit} characters" in refused.value.message()
    assert tokenize("a cat").as_numpy("token_ids").shape[1] == spec.text_max_length  # still serving


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
