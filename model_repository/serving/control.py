"""The secret that opens Triton's control plane, and the tritonserver options that close it to everyone else.

Triton's model-repository API loads whatever model a caller sends it (a ``config`` and ``file:1/model.py``
parameters make it write and run that Python file inside the server), its shared-memory API maps memory the
caller names, and its logging and trace APIs change what the server writes where. ``sdtrt serve`` restricts
those four APIs, on HTTP and gRPC, to requests that carry the header ``sdtrt-control-key`` with this key.
Inference, health, metadata, model configs (clients read the spec there) and statistics stay open: they are what
the gateway, the page, perf_analyzer and Prometheus need, and none of them changes the server.

Where the key comes from, first found wins: ``--control-key-file FILE``; ``$SDTRT_CONTROL_KEY`` (the key itself,
e.g. from a Kubernetes Secret as an env var); ``$SDTRT_CONTROL_KEY_FILE``; the file ``control-key`` in sdtrt's
cache folder. A key file that does not exist is created with a new random key, readable by its owner only, so
`sdtrt serve` and `sdtrt models` on one machine share a key without anyone typing it. Rotate it by replacing the
file (or the Secret) and restarting the server. The key is never printed or logged.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sdtrt.contract.errors import UsageError
from sdtrt.pipeline.clip_vocab import cache_dir

HEADER = "sdtrt-control-key"  # the HTTP header (lower case: gRPC metadata keys must be)
# Triton's gRPC front end looks for the key under its own prefix (measured on 2.51: "This protocol is restricted,
# expecting header 'triton-grpc-protocol-sdtrt-control-key'").
GRPC_HEADER = "triton-grpc-protocol-" + HEADER
# Triton's names for the APIs (HTTP) and protocols (gRPC) the key guards; both front ends use the same names.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
ENV_KEY, ENV_FILE = "SDTRT_CONTROL_KEY", "SDTRT_CONTROL_KEY_FILE"
FILE_NAME = "control-key"
# Characters that survive a command line, an HTTP header and Triton's "apis:key=value" option unchanged.
_KEY_FORMAT = re.compile(r"[A-Za-z0-9_.~-]{16,256}")


@dataclass(frozen=True)
class ControlKey:
    value: str = field(repr=False)
    source: str  # where it was read, for messages (never the value)

    def headers(self) -> dict[str, str]:
        """For Triton's HTTP API."""
        return {HEADER: self.value}

    def grpc_headers(self) -> dict[str, str]:
        """For Triton's gRPC API (tritonclient.grpc's ``headers=``)."""
        return {GRPC_HEADER: self.value}

    def triton_args(self) -> list[str]:
        apis = ",".join(RESTRICTED_APIS)
        return [f"--http-restricted-api={apis}:{HEADER}={self.value}",
                f"--grpc-restricted-protocol={apis}:{HEADER}={self.value}"]


def default_key_file() -> Path:
    return cache_dir() / FILE_NAME


def _checked(value: str, source: str) -> ControlKey:
    value = value.strip()
    if not _KEY_FORMAT.fullmatch(value):
        # never echo the value: it is meant to be a secret
        raise UsageError(f"the control key from {source} must be 16 to 256 characters of letters, digits and "
                         "'-_.~' (e.g. `openssl rand -hex 32`)")
    return ControlKey(value, source)


def _create(path: Path) -> None:
    """A new random key at ``path``, mode 0600, written to a temporary name and linked into place, so that two
    servers starting at once end up with one key (the second link fails and that process reads the first's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:  # mkstemp's file is 0600 already
            out.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(temp)


def read_key_file(path: Path, create: bool) -> ControlKey:
    path = Path(path)
    if not path.is_file():
        if not create:
            raise UsageError(f"no control key at {path}: `sdtrt serve` writes one when it starts (or pass "
                             f"--control-key-file / set ${ENV_KEY} to the server's key)")
        try:
            _create(path)
        except OSError as exc:
            raise UsageError(f"cannot write a control key to {path} ({exc.strerror}): pass --control-key-file with "
                             f"a writable path, or set ${ENV_KEY}") from None
    try:
        return _checked(path.read_text(), str(path))
    except OSError as exc:
        raise UsageError(f"cannot read the control key {path} ({exc.strerror})") from None


def resolve_key(path: Path | None = None, *, create: bool = False) -> ControlKey:
    """The control key, from ``path`` or the environment or the default file (see the module docstring);
    ``create``: write a new one where the chosen file is missing (the server does; clients only read)."""
    if path is not None:
        return read_key_file(path, create)
    if os.environ.get(ENV_KEY):
        return _checked(os.environ[ENV_KEY], f"${ENV_KEY}")
    if os.environ.get(ENV_FILE):
        return read_key_file(Path(os.environ[ENV_FILE]), create)
    return read_key_file(default_key_file(), create)
