"""Errors that reach users. Each message says what was wrong and what to do instead."""

from __future__ import annotations

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
