"""The A1111 gateway's front door, in front of every route (its own, FastAPI's /docs and /openapi.json, and
404s alike): HTTP basic credentials, a ceiling on the request body, and cross-site request refusal.

An ASGI middleware rather than a FastAPI dependency: a dependency guards only the routes it is attached to, and
FastAPI adds its documentation routes without them (measured: /docs answered 200 without credentials).

Cross-site requests: a browser that has the gateway's basic credentials cached sends them with any request a page
from another site makes it send, including a form POST to /sdapi/v1/interrupt, which needs no JSON body and so
no CORS preflight. Browsers say where a request comes from (``Sec-Fetch-Site``, ``Origin``); a state-changing
request that says another site is refused. Scripts and programs (webuiapi, curl) send neither and pass.

What the gateway and the page tell users of a failure also leaves by this door (``server_failure``): a fixed text
and an error id, the details (the Triton server's address, its own words) in the log only.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import uuid
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

from sdtrt.client.client import ServerUnavailable

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

USER_KEY = "sdtrt.user"  # the scope key the authenticated user's name is put under ("" without credentials)
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
DEFAULT_MAX_BODY = 64 * 2**20  # a txt2img body is a few kB; img2img with a few large pictures fits


class BodyTooLarge(HTTPException):
    """Raised while the body is read; an HTTPException so that FastAPI answers it as the 413 it is (it turns any
    other exception met while parsing a body into a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large(limit))


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (the first, as text), or None."""
    for key, value in scope.get("headers") or []:
        if key == name:
            return value.decode("latin-1")
    return None


def _user(scope: Scope, users: dict[str, str]) -> str | None:
    """The user whose basic credentials the request carries, compared in constant time; None otherwise."""
    given = header(scope, b"authorization") or ""
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, sep, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    expected = users.get(name)
    # compare against something even for an unknown user, so that the time taken does not tell which names exist
    ok = secrets.compare_digest(password.encode(), (expected or secrets.token_hex(16)).encode())
    return name if sep and expected is not None and ok else None


def cross_site(scope: Scope) -> bool:
    """True when a browser says this request was made by a page of another site."""
    fetch_site = header(scope, b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site not in ("same-origin", "none")
    origin = header(scope, b"origin")
    if origin is None:
        return False  # not sent by a browser's cross-origin request (browsers send Origin on every cross-site POST)
    host = header(scope, b"host") or ""
    return origin == "null" or urlsplit(origin).netloc.lower() != host.lower()


def logged(exc: BaseException, log: logging.Logger) -> str:
    """Log a failure with its details under a fresh id and return the id: what the user is told instead of the
    details (paths, hosts and internals stay in the log)."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
    return error_id


def server_failure(exc: BaseException, log: logging.Logger) -> str:
    """What a user of the gateway or the page is told when the sdtrt server behind it failed or could not be
    reached: what to do, and the id its details were logged under. The client's messages name the server's
    address (and Triton's words may name its hosts and paths): they are for the operator, not the user."""
    error_id = logged(exc, log)
    if isinstance(exc, ServerUnavailable):
        return (f"the sdtrt server is busy or restarting: retry in {exc.retry_after_s} seconds (error {error_id}; "
                "the log has the details)")
    return (f"the sdtrt server failed (error {error_id}; the log has the details): try again, and tell its "
            "operator if it persists")


HEALTH_PATH = "/healthz"
OPEN_PATHS = frozenset({HEALTH_PATH})  # Kubernetes' probes carry no credentials


class WebGuard:
    """ASGI middleware: ``users`` (name -> password; None or empty: no credentials asked, everyone is the user
    ""), ``max_body`` bytes per request body (413 beyond, checked on Content-Length before reading and counted
    while reading), state-changing cross-site requests refused (403)."""

    def __init__(self, app, users: dict[str, str] | None = None, max_body: int = DEFAULT_MAX_BODY,
                 realm: str = "sdtrt"):
        self.app = app
        self.users = dict(users or {})
        self.max_body = max_body
        self.realm = realm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD"):
            await self.app({**scope, USER_KEY: ""}, receive, send)  # says ready or not, nothing else
            return
        if self.users:
            user = _user(scope, self.users)
            if user is None:
                await _answer(send, 401, "Incorrect username or password",
                              [(b"www-authenticate", f'Basic realm="{self.realm}"'.encode())])
                return
        else:
            user = ""
        if scope["method"] not in SAFE_METHODS and cross_site(scope):
            await _answer(send, 403, "cross-site request refused: send it from this site's own pages or from a "
                                     "program (no Origin / Sec-Fetch-Site headers)")
            return
        length = header(scope, b"content-length")
        try:
            declared = int(length) if length is not None else 0
        except ValueError:
            await _answer(send, 400, "Content-Length is not a number")
            return
        if declared > self.max_body:
            await _answer(send, 413, _too_large(self.max_body), close=True)
            return
        scope = {**scope, USER_KEY: user}
        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _answer(send, 413, _too_large(self.max_body), close=True)


def _too_large(limit: int) -> str:
    return (f"the request body is larger than {limit // 2**20} MiB: send smaller pictures (JPEG or WebP compress "
            "better), or fewer at once")


async def _answer(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None,
                  close: bool = False) -> None:
    """An error in A1111's shape (see a1111_api.a1111_error)."""
    body = json.dumps({"error": {401: "Unauthorized", 403: "Forbidden", 413: "RequestTooLarge"}.get(status, "HTTPError"),
                       "detail": message, "body": "", "errors": message}).encode()
    extra = [(b"connection", b"close")] if close else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or []), *extra]})
    await send({"type": "http.response.body", "body": body})
