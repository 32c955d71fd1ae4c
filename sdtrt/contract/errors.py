"""Errors that reach users. Each message says what was wrong and what to do instead."""

from __future__ import annotations

import re
from typing import Any


class SdtrtError(Exception):
    """Base class: the CLI prints these as one line and exits with a non-zero status."""

    exit_code = 1


class UsageError(SdtrtError):
    """A path, option or file given by the user is unusable."""

    exit_code = 2


ECHO_LIMIT = 80  # characters of a user's value that an error message repeats


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """A value as an error message repeats it: its repr, cut to ``limit`` characters with its length said, so that
    no request can make an error too big for the protocol to carry (gRPC status details have a size limit)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"


class InvalidRequest(UsageError):
    """A generation setting is outside what the model accepts. Names the field and the allowed range."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}={echo(value)}: {field} must be {allowed}")


INVALID_MESSAGE = re.compile(r"invalid ([A-Za-z_][\w.]*)=")  # how every InvalidRequest's message starts


def invalid_field(message: str) -> str | None:
    """The field an InvalidRequest's message names, wherever it was raised; None for any other message."""
    found = INVALID_MESSAGE.match(message)
    return found.group(1) if found else None


class RelayedInvalidRequest(InvalidRequest):
    """An InvalidRequest a nested model (the tokenizer, a network) raised, passed on with its message unchanged, so
    that the client sees the same words and the same class however many hops away the check ran."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.field, self.value, self.allowed = invalid_field(message) or "", None, ""


class Unavailable(SdtrtError):
    """A stage of the server did not answer in time or is being restarted (a hung or dead process): nothing was
    wrong with the request, and the same request may succeed in a minute."""

    retry_after_s = 30


class Cancelled(SdtrtError):
    """The client cancelled the request, or its connection closed."""


class DiskFull(SdtrtError):
    """A file could not be written for lack of space: names what filled and how much was needed. Nothing partial is
    left behind (sdtrt.contract.files)."""

    def __init__(self, path: Any, needed: int | None, free: int | None):
        self.path, self.needed, self.free = path, needed, free
        need = f"{needed:,} bytes needed, " if needed is not None else ""
        have = f"{free:,} free" if free is not None else "no space left"
        super().__init__(f"no space left on the device of {path} ({need}{have}): free some space there, or point the "
                         "output somewhere larger, and send the request again")


# Each error kind sdtrt raises, the status Triton's Python models answer it with (pb_utils.TritonError), and what
# a client then sees over gRPC, over Triton's HTTP, and from the A1111 gateway. tests/test_reliability.py and
# tests/test_faults.py hold the rows to what the real servers answer.
ERROR_KINDS: dict[str, dict[str, Any]] = {
    "InvalidRequest": {"triton": "INVALID_ARG", "grpc": "INVALID_ARGUMENT", "http": 400, "gateway": 422},
    # (HTTP clients cannot cancel a Triton request; the gateway's own clients interrupt instead: A1111's 200)
    "Cancelled": {"triton": "CANCELLED", "grpc": "CANCELLED", "http": None, "gateway": None},
    "Unavailable": {"triton": "UNAVAILABLE", "grpc": "UNAVAILABLE", "http": 503, "gateway": 503},
    "DiskFull": {"triton": None, "grpc": None, "http": None, "gateway": 507},
    "other": {"triton": "INTERNAL", "grpc": "INTERNAL", "http": 500, "gateway": 502},
}
