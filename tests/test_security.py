"""Triton's control plane, tried as an attacker who reaches its ports would: loading a model that carries its own
code, unloading the served ones, shared memory, logging and trace are refused without the control key, over HTTP
and gRPC, while inference, health and metadata stay open to the clients that need them (sdtrt.model_repository.serving.control)."""

from __future__ import annotations

import base64
import json
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from sdtrt.model_repository.serving.control import GRPC_HEADER, HEADER, RESTRICTED_APIS, resolve_key
from sdtrt.contract.errors import UsageError

EVIL_MODEL = '''
import pathlib
class TritonPythonModel:
    def initialize(self, args):
        pathlib.Path({marker!r}).write_text("ran inside the server")
    def execute(self, requests):
        return []
'''


def http(server, method: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def evil_load_body(marker: Path) -> dict:
    config = {"name": "evil", "backend": "python", "max_batch_size": 0,
              "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
              "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]}
    code = EVIL_MODEL.format(marker=str(marker)).encode()
    return {"parameters": {"config": json.dumps(config), "file:1/model.py": base64.b64encode(code).decode()}}


def test_a_model_that_carries_its_own_code_is_refused_and_nothing_runs(server, tmp_path):
    marker = tmp_path / "pwned"
    status, text = http(server, "POST", "/v2/repository/models/evil/load", evil_load_body(marker))
    assert status in (401, 403), (status, text)
    assert "restricted" in text
    grpc = grpcclient.InferenceServerClient(server.url)
    config = evil_load_body(marker)["parameters"]["config"]
    files = {"file:1/model.py": EVIL_MODEL.format(marker=str(marker)).encode()}
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.load_model("evil", config=config, files=files)
    time.sleep(2)  # a model load runs initialize() at once; give it the time it would take
    assert not marker.exists(), "the caller's code ran inside the server"
    index = grpc.get_model_repository_index(headers=server.control_key.grpc_headers(), as_json=True)
    assert "evil" not in {m["name"] for m in index.get("models", [])}


def test_unauthenticated_callers_cannot_unload_or_reload_the_served_models(server):
    for action in ("unload", "load"):
        status, text = http(server, "POST", f"/v2/repository/models/txt2img/{action}")
        assert status in (401, 403), (action, status, text)
        status, _ = http(server, "POST", f"/v2/repository/models/txt2img/{action}",
                         headers={HEADER: "not-the-key-but-long-enough"})
        assert status in (401, 403)
    grpc = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.unload_model("txt2img")
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.unload_model("txt2img", headers={GRPC_HEADER: "not-the-key-but-long-enough"})
    assert grpc.is_model_ready("txt2img")


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/r/register", {"key": "/sdtrt-probe", "offset": 0, "byte_size": 64}),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", {"log_file": "/tmp/sdtrt-probe.log"}),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", {"trace_file": "/tmp/sdtrt-probe.json"}),
])
def test_shared_memory_logging_and_trace_want_the_key_over_http(server, method, path, body):
    status, text = http(server, method, path, body)
    assert status in (401, 403), (path, status, text)


def test_shared_memory_logging_and_trace_want_the_key_over_grpc(server):
    grpc = grpcclient.InferenceServerClient(server.url)
    calls = [lambda **kw: grpc.get_model_repository_index(**kw), lambda **kw: grpc.get_system_shared_memory_status(**kw),
             lambda **kw: grpc.register_system_shared_memory("r", "/sdtrt-probe", 64, **kw),
             lambda **kw: grpc.get_log_settings(**kw), lambda **kw: grpc.update_log_settings({"log_verbose_level": 1}, **kw),
             lambda **kw: grpc.get_trace_settings(**kw)]
    for call in calls:
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    # with the key the same APIs answer: the restriction is the key, not a broken API
    assert grpc.get_system_shared_memory_status(headers=server.control_key.grpc_headers(), as_json=True) is not None
    assert grpc.get_log_settings(headers=server.control_key.grpc_headers(), as_json=True)


def test_inference_health_and_metadata_stay_open(server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/txt2img", "/v2/models/txt2img/config",
                 "/v2/models/txt2img/ready"):
        status, _ = http(server, "GET", path)
        assert status == 200, path
    from servers import raw_infer

    result = raw_infer(server, {"prompt": ("a red circle", "BYTES"), "steps": (2, "INT32")})
    assert result.as_numpy("images").shape[0] == 1


def test_the_key_is_never_in_the_servers_log(server):
    text = Path(server.log_file).read_text(errors="replace")
    assert text and server.control_key.value not in text


def test_a_new_key_file_is_random_private_and_shared_by_the_next_reader(tmp_path, monkeypatch):
    monkeypatch.delenv("SDTRT_CONTROL_KEY", raising=False)
    path = tmp_path / "keys" / "control-key"
    first = resolve_key(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_key(path).value == first.value and len(first.value) >= 32
    assert resolve_key(tmp_path / "other", create=True).value != first.value
    assert first.value not in repr(first)
    with pytest.raises(UsageError, match="sdtrt serve"):
        resolve_key(tmp_path / "missing")  # a client never invents a key
    (tmp_path / "weak").write_text("short\n")
    with pytest.raises(UsageError, match="16 to 256") as info:
        resolve_key(tmp_path / "weak")
    assert "short" not in str(info.value)
    monkeypatch.setenv("SDTRT_CONTROL_KEY", "k" * 40)
    assert resolve_key().value == "k" * 40 and resolve_key().source == "$SDTRT_CONTROL_KEY"


def test_every_restricted_api_is_one_triton_knows():
    # the names are Triton 2.51's (tritonserver --help); a misspelt one would make the server refuse to start
    assert set(RESTRICTED_APIS) <= {"health", "metadata", "inference", "shared-memory", "model-config",
                                    "model-repository", "statistics", "trace", "logging"}


@pytest.mark.parametrize("path", ["//v2/repository/index", "/v2//repository/index", "/v2/repository/index/",
                                  "/V2/repository/index", "/v2/repository%2Findex", "/v2/%72epository/index",
                                  "/v2/models/../repository/index", "/./v2/repository/index",
                                  "/v2/repository/index?sdtrt-control-key=x", "//v2/systemsharedmemory/status",
                                  "/v2/systemsharedmemory//status", "//v2/logging", "//v2/trace/setting"])
def test_no_spelling_of_a_restricted_path_reaches_it_without_the_key(server, path):
    """Spellings a front end might route to the same handler while its check looks at the literal path."""
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=b"", method="POST")
    for method in ("POST", "GET"):
        request.method = method
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        assert status in (400, 401, 403, 404, 405), (path, method, status)
