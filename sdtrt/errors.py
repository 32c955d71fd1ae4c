"""Errors that reach users. Each message says what was wrong and what to do instead."""

from __future__ import annotations

from typing import Any


class SdtrtError(Exception):
    """Base class: the CLI prints these as one line and exits with a non-zero status."""

    exit_code = 1


class UsageError(SdtrtError):
    """A path, option or file given by the user is unusable."""

    exit_code = 2


class InvalidRequest(UsageError):
    """A generation setting is outside what the model accepts. Names the field and the allowed range."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}={value!r}: {field} must be {allowed}")
