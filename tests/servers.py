"""Helpers for tests that talk to a real tritonserver over loopback."""

from __future__ import annotations

import socket

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


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
