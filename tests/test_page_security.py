"""The Gradio page (`sdtrt ui`) is safe to expose: driven through Gradio's HTTP API as a hostile client would (raw
requests, no browser), against a real server, it reads no file the client names, serves no file of the outputs
folder, wants the login on every route, refuses cross-site requests and bounded-or-refused pictures.

Endpoints are found in the page's own /config by the component and event they belong to (not by api_name), so the
same requests are sent whatever the handlers are called."""

from __future__ import annotations

import http.client
import http.cookiejar
import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from servers import CHROMIUM, answered, first_answer, free_ports
from sdtrt.contract.pictures import MAX_PICTURE_PIXELS

ROOT = Path(__file__).resolve().parents[1]
SECRET = "a prompt someone else typed"
FILE = {"_type": "gradio.FileData"}  # the mark Gradio puts on file data (its own path check needs it)
PICTURE = "Picture (draw the inpainting mask on it; no mask: img2img)"  # the img2img tab's ImageMask


def start_page(server, tmp: Path, *extra: str):
    """`sdtrt ui` on a free port, its uploads in tmp/uploads (GRADIO_TEMP_DIR) and its pictures in tmp/outputs."""
    (port,) = free_ports(1)
    uploads, outputs = tmp / "uploads", tmp / "outputs"
    uploads.mkdir()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(uploads))
    # its log to a file, not a pipe: the refusals below log tracebacks, and a full pipe would stall the server
    with open(tmp / "ui.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "ui", "--url", server.url, "--port", str(port),
                                 "--out", str(outputs), *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        assert first_answer(f"{base}/", proc) == 200
    except AssertionError:
        raise AssertionError((tmp / "ui.log").read_text()[-3000:]) from None
    return proc, {"base": base, "uploads": uploads, "outputs": outputs, "log": tmp / "ui.log"}


def stop(proc) -> None:
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def site(server, tmp_path_factory):
    proc, info = start_page(server, tmp_path_factory.mktemp("page"))
    try:
        yield info
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def guarded(server, tmp_path_factory):
    proc, info = start_page(server, tmp_path_factory.mktemp("page-auth"), "--gradio-auth", "carol:pa55word")
    try:
        yield info
    finally:
        stop(proc)


def secret_png(path: Path, text: str = SECRET) -> Path:
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", f"{text}\nSteps: 3, Seed: 1, Size: 8x8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, pnginfo=meta)
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes that say they are a width x height PNG (a picture bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b""))


class Page:
    """A raw HTTP client of one page: its config, Gradio's queue (join + SSE), uploads, with cookies."""

    def __init__(self, base: str, headers: dict[str, str] | None = None):
        self.base = base
        self.headers = headers or {}
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.session = uuid.uuid4().hex[:11]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 30, read: bool = True) -> tuple[int, bytes]:
        """The status and body of one request (``read=False``: the status alone, as for an endless stream)."""
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers={**self.headers, **(headers or {})})
        try:
            with self.opener.open(req, timeout=timeout) as response:
                return response.status, response.read() if read else b""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def login(self, user: str, password: str) -> int:
        form = urllib.parse.urlencode({"username": user, "password": password}).encode()
        return self.request("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})[0]

    def config(self) -> dict:
        status, body = self.request("GET", "/config")
        assert status == 200, (status, body[:300])
        return json.loads(body)

    def endpoint(self, elem_id: str, event: str, overrides: dict[str, object] | None = None) -> tuple[int, list]:
        """The fn_index of the handler of ``event`` on the component ``elem_id``, and its inputs: each control's
        default value, or ``overrides[label]``."""
        config = self.config()
        components = {c["id"]: c for c in config["components"]}
        (target,) = [i for i, c in components.items() if c["props"].get("elem_id") == elem_id]
        (dep,) = [d for d in config["dependencies"] if [target, event] in [list(t) for t in d["targets"]]]
        overrides = overrides or {}
        data = [overrides.get(components[i]["props"].get("label"), components[i]["props"].get("value"))
                for i in dep["inputs"]]
        return dep["id"], data

    def call(self, fn_index: int, data: list, event_data: object = None, timeout: float = 120) -> dict:
        """Run a handler through Gradio's queue, as the page does; the final message (its output or error)."""
        body = json.dumps({"data": data, "fn_index": fn_index, "session_hash": self.session,
                           "event_data": event_data, "trigger_id": None}).encode()
        status, answer = self.request("POST", "/gradio_api/queue/join", body, {"Content-Type": "application/json"})
        assert status == 200, (status, answer[:300])
        event_id = json.loads(answer)["event_id"]
        req = urllib.request.Request(f"{self.base}/gradio_api/queue/data?session_hash={self.session}",
                                     headers=self.headers)
        with self.opener.open(req, timeout=timeout) as stream:
            for line in stream:
                line = line.decode().strip()
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("event_id") == event_id and message.get("msg") == "process_completed":
                        return message
        raise AssertionError(f"no result for event {event_id}")

    def upload(self, name: str, content: bytes, headers: dict[str, str] | None = None) -> tuple[int, object]:
        boundary = uuid.uuid4().hex
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        body = head.encode() + content + f"\r\n--{boundary}--\r\n".encode()
        status, answer = self.request("POST", "/gradio_api/upload", body,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})
        return status, (json.loads(answer) if status == 200 else answer)


def error_of(message: dict) -> str | None:
    """The error a handler's final message carries (None: it succeeded; Gradio hides the text of errors that
    are not gr.Error)."""
    if message.get("success"):
        return None
    return (message.get("output") or {}).get("error") or "(an error Gradio does not show)"


def output_text(message: dict) -> str:
    return json.dumps(message.get("output"))


def generate(page: Page, seed: int, **overrides) -> dict:
    fn, data = page.endpoint("txt2img_generate", "click", {"Prompt": "a lighthouse", "Sampling steps": 2, "Width": 64,
                                                            "Height": 64, "Seed": seed, **overrides})
    return page.call(fn, data)


def test_handlers_read_no_file_the_client_names(site, server):
    """(a) PNG Info and the gallery click, called through Gradio's API with paths of the server's files: nothing
    of those files comes back. Gradio checks marked file data against its upload folder; a client that leaves the
    mark out, or names a file inside that folder (another session's picture), is answered by the page's own
    checks. The batch count and the other controls are bounded before any work starts."""
    page = Page(site["base"])
    elsewhere = secret_png(site["outputs"] / "txt2img-images" / "00042-1.png")  # another user's saved picture
    in_uploads = secret_png(site["uploads"] / "someone-else" / "picture.png")  # another session's picture
    link = site["uploads"] / "link.png"
    link.symlink_to(elsewhere)
    passwd = Path("/etc/passwd").read_text().splitlines()[0]
    readme = (ROOT / "README.md").read_text().splitlines()[0]

    png_fn, _ = page.endpoint("pnginfo_image", "change")
    for path in (str(elsewhere), str(link), "/etc/passwd", str(ROOT / "README.md"), str(ROOT / "docs" / "ui.png")):
        for payload in ({"path": path}, {"path": path, "meta": FILE}, {"path": path, "url": path}):
            message = page.call(png_fn, [payload])
            text = output_text(message)
            assert error_of(message) is not None, (payload, text)
            assert SECRET not in text and passwd not in text and readme not in text, (payload, text)

    select_fn, select_data = page.endpoint("txt2img_gallery", "select")
    for path in ("/etc/passwd", str(ROOT / "README.md"), str(elsewhere), str(in_uploads), str(link)):
        message = page.call(select_fn, select_data, {"index": 0, "value": {"image": {"path": path}}})
        text = output_text(message)
        assert SECRET not in text and passwd not in text and readme not in text, (path, text)

    # the gallery click shows what sdtrt made for this session, whatever path the click names
    for seed, batch, index in ((321, 1, 0), (400, 2, 1)):  # the second result replaces the first in the gallery
        made = generate(page, seed, **{"Batch size": batch})
        assert error_of(made) is None, output_text(made)
        message = page.call(select_fn, select_data, {"index": index, "value": {"image": {"path": str(in_uploads)}}})
        assert f"Seed: {seed + index}," in output_text(message) and SECRET not in output_text(message)
    for index in (5, -1, "0", None, [0]):
        message = page.call(select_fn, select_data, {"index": index, "value": None})
        assert SECRET not in output_text(message) and "Seed:" not in output_text(message), index

    # the img2img picture: only an upload of this page (Gradio wants the file data's mark there, and checks it)
    i2i_fn, _ = page.endpoint("img2img_generate", "click")
    for payload in ({"path": str(elsewhere)}, {"path": str(elsewhere), "meta": FILE},
                    {"path": str(link), "meta": FILE}):
        _, data = page.endpoint("img2img_generate", "click", {
            "Prompt": "a copy", "Sampling steps": 2, "Width": 64, "Height": 64,
            PICTURE: {"background": payload, "layers": [], "composite": None, "id": None}})
        assert error_of(page.call(i2i_fn, data)) is not None, payload

    # counts and choices past what the controls offer are refused before any work starts (the server sees none)
    saved, before = set((site["outputs"] / "txt2img-images").iterdir()), answered(server, "txt2img")
    for overrides in ({"Batch count": 100000000}, {"Batch count": 101}, {"Batch count": 0},
                      {"Stable Diffusion checkpoint": "not a model"}, {"Styles": ["not a style"]},
                      {"Sampling steps": 100000}, {"Width": 10**9}):
        start = time.monotonic()
        message = generate(page, 5, **overrides)
        assert error_of(message) is not None, overrides
        assert time.monotonic() - start < 10, overrides
    assert set((site["outputs"] / "txt2img-images").iterdir()) == saved and answered(server, "txt2img") == before


def test_files_of_the_outputs_folder_are_not_served(site, tmp_path):
    """(b) The gallery, in headless Chromium, shows Gradio's own copies of the pictures (they load, their PNGs
    carry the infotext, a click shows it); a file URL for the outputs folder, or any other path not handed out by
    the page, is refused."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it as root)")
    from playwright.sync_api import sync_playwright

    page = Page(site["base"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page(viewport={"width": 1280, "height": 1100})
        tab.goto(site["base"] + "/", wait_until="domcontentloaded")
        prompt = tab.locator("#tab_txt2img").get_by_label("Prompt", exact=True)
        prompt.wait_for(timeout=60000)
        prompt.fill("a harbour at night")
        for label, value in (("Sampling steps", 2), ("Width", 64), ("Height", 64), ("Batch size", 2)):
            box = tab.locator("#tab_txt2img").get_by_label(f"number input for {label}")
            box.fill(str(value))
            box.press("Enter")
        tab.locator("#tab_txt2img").get_by_label("Seed", exact=True).fill("900")
        tab.locator("#txt2img_generate").click()
        thumbs = tab.locator("#txt2img_gallery button.thumbnail-item img")
        thumbs.nth(1).wait_for(timeout=120000)
        tab.wait_for_function("() => [...document.querySelectorAll('#txt2img_gallery button.thumbnail-item img')]"
                              ".every(img => img.complete && img.naturalWidth > 0)", timeout=30000)
        sources = [thumbs.nth(i).get_attribute("src") for i in range(thumbs.count())]
        tab.locator("#txt2img_gallery button.thumbnail-item").nth(1).click()
        tab.wait_for_function("() => document.querySelector('#txt2img_info textarea')?.value.includes('Seed: 901,')",
                              timeout=30000)
        browser.close()
    uploads = str(site["uploads"].resolve())
    for src in sources:
        path = urllib.parse.unquote(urllib.parse.urlsplit(src).path.split("/gradio_api/file=", 1)[1])
        assert path.startswith(uploads), src  # Gradio's copy, not the outputs folder
        status, body = page.request("GET", urllib.parse.urlsplit(src).path)
        assert status == 200
        with Image.open(io.BytesIO(body)) as im:
            assert "Seed: 90" in im.info["parameters"]
    saved = sorted((site["outputs"] / "txt2img-images").iterdir())
    assert {p.name.split("-", 1)[1] for p in saved} >= {"900.png", "901.png"}  # saved as A1111 does
    outsider = secret_png(tmp_path / "elsewhere.png")
    for path in (*saved, outsider, Path("/etc/passwd"), ROOT / "README.md", ROOT / "docs" / "ui.png"):
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            status, body = page.request("GET", route + urllib.parse.quote(str(path)))
            assert status in (403, 404), (route, path, status)
            assert SECRET.encode() not in body


# Every route Gradio 6 answers (found in gradio/routes.py), with a request each would take.
GUARDED_ROUTES = [
    ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/gradio_api/openapi.json"),
    ("GET", "/gradio_api/queue/status"), ("GET", "/gradio_api/queue/data?session_hash=x"),
    ("GET", "/gradio_api/heartbeat/x"), ("GET", "/gradio_api/user"), ("GET", "/gradio_api/token"),
    ("GET", "/gradio_api/app_id"), ("GET", "/gradio_api/runs"), ("GET", "/gradio_api/run-history/records"),
    ("GET", "/gradio_api/upload_progress?upload_id=x"), ("GET", "/gradio_api/deep_link?session_hash=x"),
    ("GET", "/gradio_api/call/txt2img_handler/x"), ("GET", "/gradio_api/stream/x/y/1/playlist.m3u8"),
    ("GET", "/gradio_api/vibe-code"), ("GET", "/monitoring"), ("GET", "/monitoring/x"),
    ("GET", "/gradio_api/theme.css"),
    ("GET", "/gradio_api/file=/etc/passwd"), ("GET", "/gradio_api/proxy=http://127.0.0.1/"),
    ("GET", "/gradio_api/custom_component/a/b/c/d"), ("GET", "/svelte/x.js"), ("GET", "/gradio_api/dev/reload"),
    ("POST", "/gradio_api/queue/join"), ("POST", "/gradio_api/call/txt2img_handler"),
    ("POST", "/gradio_api/run/txt2img_handler"), ("POST", "/gradio_api/api/txt2img_handler"),
    ("POST", "/gradio_api/upload"), ("POST", "/gradio_api/component_server"), ("POST", "/gradio_api/cancel"),
    ("POST", "/gradio_api/reset"), ("POST", "/gradio_api/stream/x"), ("POST", "/gradio_api/stream/x/close"),
    ("POST", "/gradio_api/process_recording"), ("POST", "/gradio_api/vibe-edit"),
    ("POST", "/gradio_api/run-history/connect"),
]


def test_every_route_wants_the_login(guarded):
    """(c) With --gradio-auth, only the login page and the static files that draw it answer before the login;
    the login page does not describe the page's API; after the login everything works."""
    page = Page(guarded["base"])
    for method, path in GUARDED_ROUTES:
        body = b"{}" if method == "POST" else None
        status, _ = page.request(method, path, body, {"Content-Type": "application/json"}, timeout=10, read=False)
        assert status in (401, 403) or (300 <= status < 400), (method, path, status)
    status, home = page.request("GET", "/")
    assert status == 200
    for word in (b"txt2img_handler", b"named_endpoints\":{\"/", b"Euler a", b"Stable Diffusion checkpoint"):
        assert word not in home, word  # the login page says nothing of the page behind it
    assert page.login("carol", "wrong") >= 400
    assert page.request("GET", "/config")[0] == 401
    assert page.login("carol", "pa55word") == 200
    assert page.request("GET", "/gradio_api/info")[0] == 200
    status, home = page.request("GET", "/")
    assert status == 200 and b"txt2img_handler" in home  # logged in: the page as Gradio draws it
    made = generate(page, 11)
    assert error_of(made) is None, output_text(made)
    (picture,) = made["output"]["data"][0]
    assert page.request("GET", urllib.parse.urlsplit(picture["image"]["url"]).path)[0] == 200
    stranger = Page(guarded["base"])  # no login: not even the URL the page handed out
    assert stranger.request("GET", urllib.parse.urlsplit(picture["image"]["url"]).path)[0] == 401


def test_bad_pictures_in_png_info_get_a_message_and_the_page_keeps_serving(site):
    """(d) PNG Info decodes within bounds: a picture bomb, a file that is no picture, a format other than PNG,
    JPEG or WebP, a file past the picture size each get a message that says so; an upload past Gradio's file
    limit is refused; a good PNG still reads."""
    page = Page(site["base"])
    png_fn, _ = page.endpoint("pnginfo_image", "change")
    gif = io.BytesIO()
    Image.new("RGB", (16, 16)).save(gif, format="GIF")
    good = io.BytesIO()
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a good one\nSteps: 4, Seed: 7")
    Image.new("RGB", (16, 16)).save(good, format="PNG", pnginfo=meta)
    cases = [
        ("bomb.png", png_claiming(50000, 50000), "pixels"),
        ("large.png", png_claiming(5000, 5000), "pixels"),
        ("notes.png", b"this is not a picture\n" * 100, "PNG, JPEG or WebP"),
        ("anim.gif", gif.getvalue(), "PNG, JPEG or WebP"),
        ("huge.png", good.getvalue() + b"\0" * (33 * 2**20), "MiB"),
    ]
    for name, content, words in cases:
        status, paths = page.upload(name, content)
        assert status == 200, (name, status)
        message = page.call(png_fn, [{"path": paths[0], "orig_name": name, "meta": FILE}])
        error = error_of(message)
        assert error is not None and words in error, (name, message)
    # past the ceiling on a request's body: refused on its Content-Length, before a byte of it is read
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(site["base"]).netloc, timeout=10)
    connection.putrequest("POST", "/gradio_api/upload")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(70 * 2**20))
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    status, paths = page.upload("good.png", good.getvalue())
    message = page.call(png_fn, [{"path": paths[0], "orig_name": "good.png", "meta": FILE}])
    assert error_of(message) is None and "Seed: 7" in output_text(message)
    assert page.request("GET", "/")[0] == 200


def test_the_img2img_picture_is_bounded(site, server):
    """(d) The img2img picture is decoded by Gradio, with a plain Image.open the page holds to sdtrt's rules: a
    picture past sdtrt's pixel limit (a real one, or a header that claims a bomb) is refused before it is
    decoded, and so is any format but PNG, JPEG and WebP (BMP, TIFF: Pillow would decode them), each naming the
    field. Nothing of them reaches the server, and the page keeps serving."""
    page = Page(site["base"])
    fn, _ = page.endpoint("img2img_generate", "click")
    big = io.BytesIO()
    Image.new("RGB", (5000, 4000), (9, 9, 9)).save(big, format="PNG")  # 20 megapixels in a few kB of PNG
    other = {}
    for fmt in ("BMP", "TIFF"):
        other[fmt] = io.BytesIO()
        Image.new("RGB", (64, 64), (9, 9, 9)).save(other[fmt], format=fmt)
    folder = site["outputs"] / "img2img-images"
    before, requests = (set(folder.glob("*")) if folder.exists() else set()), answered(server, "img2img")
    limit = f"at most {MAX_PICTURE_PIXELS:,} pixels"
    for name, content, words in (("big.png", big.getvalue(), limit), ("bomb.png", png_claiming(50000, 50000), limit),
                                 ("picture.bmp", other["BMP"].getvalue(), "a PNG, JPEG or WebP picture"),
                                 ("picture.tiff", other["TIFF"].getvalue(), "a PNG, JPEG or WebP picture")):
        status, paths = page.upload(name, content)
        assert status == 200
        _, data = page.endpoint("img2img_generate", "click", {
            "Prompt": "a copy", "Sampling steps": 2, "Width": 64, "Height": 64,
            PICTURE: {"background": {"path": paths[0], "orig_name": name, "meta": FILE}, "layers": [],
                      "composite": None, "id": None}})
        start = time.monotonic()
        error = error_of(page.call(fn, data))
        assert error is not None and "init_image" in error and words in error, (name, error)
        assert time.monotonic() - start < 30 and str(site["uploads"]) not in error, (name, error)
    assert (set(folder.glob("*")) if folder.exists() else set()) == before  # no work was done
    assert answered(server, "img2img") == requests
    assert page.request("GET", "/")[0] == 200


def test_cross_site_requests_are_refused(site, guarded):
    """(e) A page of another site can neither start nor interrupt a generation (a form POST, or a script's fetch
    with the user's login cookie), upload, log in, or read the page's API; the page itself, and programs that
    send no browser headers, are served."""
    page = Page(site["base"])
    interrupt_fn, _ = page.endpoint("txt2img_interrupt", "click")
    join = json.dumps({"data": [], "fn_index": interrupt_fn, "session_hash": "x" * 11, "event_data": None,
                       "trigger_id": None}).encode()
    foreign = [{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
               {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"},
               {"Origin": "http://evil.example"}, {"Origin": "null"}]
    for headers in foreign:
        for content_type in ("application/json", "text/plain"):
            status, _ = page.request("POST", "/gradio_api/queue/join", join, {"Content-Type": content_type, **headers})
            assert status == 403, (headers, content_type, status)
        assert page.upload("a.png", b"x", headers)[0] == 403, headers
    assert page.request("GET", "/config", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"})[0] == 403
    auth = Page(guarded["base"], {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert auth.login("carol", "pa55word") == 403  # a form on another site cannot log the browser in
    # a link from elsewhere still opens the page; the page's own requests and programs' requests go through
    assert page.request("GET", "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})[0] == 200
    for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": site["base"]}, {"Origin": site["base"]}, {}):
        status, _ = page.request("POST", "/gradio_api/queue/join", join,
                                 {"Content-Type": "application/json", **headers})
        assert status == 200, headers
