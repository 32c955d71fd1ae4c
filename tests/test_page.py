"""The Gradio page (`sdtrt ui`) in headless Chromium against a real server: generate with a batch count, inpaint
with a mask drawn on the picture, PNG Info sending its parameters to txt2img, and Interrupt stopping a running
generation while its progress bar and live preview move."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from servers import CHROMIUM, answered, first_answer, free_ports

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="Debian's chromium is not installed (scripts/test.sh installs it as root)")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(server, tmp_path_factory):
    """A running `sdtrt ui` and a headless Chromium; each test gets a fresh page of it."""
    from playwright.sync_api import sync_playwright

    (port,) = free_ports(1)
    out = tmp_path_factory.mktemp("page-outputs")
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "ui", "--url", server.url, "--port", str(port),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert first_answer(f"http://127.0.0.1:{port}/", proc) == 200
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            yield {"url": f"http://127.0.0.1:{port}/", "browser": browser, "outputs": out}
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)


def open_page(site):
    page = site["browser"].new_page(viewport={"width": 1280, "height": 1100})
    page.goto(site["url"], wait_until="domcontentloaded")
    page.get_by_role("tab", name="txt2img").wait_for(timeout=60000)
    return page


@pytest.fixture
def page(site, tmp_path, request):
    page = open_page(site)
    yield page
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)  # kept for a failure's inspection
    if os.environ.get("SDTRT_PAGE_SHOTS"):
        page.screenshot(path=f"{os.environ['SDTRT_PAGE_SHOTS']}/{request.node.name}.png", full_page=True)
    page.close()


def set_number(scope, label: str, value) -> None:
    box = scope.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Enter")


def progress_text(page, tab: str) -> str:
    return page.locator(f"#{tab}_progress .sdtrt-progress-text").inner_text()


def wait_progress(page, tab: str, words: str, timeout: float = 120000) -> None:
    page.wait_for_function(
        "([sel, words]) => (document.querySelector(sel)?.innerText || '').includes(words)",
        arg=[f"#{tab}_progress .sdtrt-progress-text", words], timeout=timeout)


def test_generate_with_a_batch_count(page, site):
    tab = page.locator("#tab_txt2img")
    tab.get_by_label("Prompt", exact=True).fill("a lighthouse at dawn")
    for label, value in (("Sampling steps", 3), ("Width", 64), ("Height", 64), ("Batch count", 2)):
        set_number(tab, label, value)
    tab.get_by_label("Seed", exact=True).fill("77")
    page.locator("#txt2img_generate").click()
    wait_progress(page, "txt2img", "Done: 2 images in 2 batches")
    page.locator("#txt2img_gallery button.thumbnail-item img").nth(1).wait_for(timeout=30000)
    assert page.locator("#txt2img_gallery button.thumbnail-item img").count() == 2
    info = page.locator("#txt2img_info textarea").input_value()
    assert "Seed: 77," in info and "Size: 64x64" in info and "Steps: 3" in info
    saved = {p.name.split("-", 1)[1] for p in (site["outputs"] / "txt2img-images").iterdir()}
    assert {"77.png", "78.png"} <= saved  # batch count: the second batch's seed continues


def test_inpaint_with_a_mask_drawn_on_the_picture(page, site, tmp_path):
    """The brush stroke in the middle becomes the mask: the middle is redrawn, the corners (far from the stroke
    and its blur) keep the uploaded picture's pixels."""
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[..., 0], picture[..., 1] = np.arange(64)[None, :] * 4, np.arange(64)[:, None] * 4  # a gradient
    Image.fromarray(picture).save(tmp_path / "init.png")
    page.get_by_role("tab", name="img2img").click()
    tab = page.locator("#tab_img2img")
    tab.get_by_label("Prompt", exact=True).fill("a red door")
    page.locator("#img2img_picture input[type=file]").set_input_files(str(tmp_path / "init.png"))
    canvas = page.locator("#img2img_picture canvas").last
    canvas.wait_for(timeout=30000)
    page.wait_for_timeout(500)
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 4, cy)  # a short stroke: Gradio's brush is wide (about 40% of this small picture)
    page.mouse.down()
    page.mouse.move(cx + 4, cy, steps=4)
    page.mouse.up()
    for label, value in (("Sampling steps", 4), ("Width", 64), ("Height", 64), ("Mask blur", 2)):
        set_number(tab, label, value)
    set_number(tab, "Denoising strength", 1)
    tab.get_by_label("Seed", exact=True).fill("5")
    page.locator("#img2img_generate").click()
    wait_progress(page, "img2img", "Done: 1 image in 1 batch")
    info = page.locator("#img2img_info textarea").input_value()
    assert "Mask blur: 2" in info and "Denoising strength: 1" in info, info
    saved = sorted((site["outputs"] / "img2img-images").iterdir())
    out = np.asarray(Image.open(saved[-1]).convert("RGB")).astype(int)
    corners = [(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(56, 64)), (slice(56, 64), slice(0, 8)),
               (slice(56, 64), slice(56, 64))]
    for rows, cols in corners:
        assert np.abs(out[rows, cols] - picture[rows, cols]).max() <= 2
    middle = (slice(30, 34), slice(28, 36))
    assert np.abs(out[middle] - picture[middle]).mean() > 20  # the stroke's area was repainted


def test_png_info_sends_its_parameters_to_txt2img(page, tmp_path):
    text = ("a castle on a hill\nNegative prompt: fog\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 5.5, Seed: 1234, Size: 128x96, Clip skip: 2, Variation seed: 99, Variation seed strength: 0.25")
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    Image.new("RGB", (128, 96), (10, 20, 30)).save(tmp_path / "a1111.png", pnginfo=meta)
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(tmp_path / "a1111.png"))
    page.wait_for_function("t => document.querySelector('#pnginfo_text textarea')?.value.includes(t)",
                           arg="Seed: 1234", timeout=30000)
    page.locator("#pnginfo_send_txt2img").click()
    tab = page.locator("#tab_txt2img")
    prompt = tab.get_by_label("Prompt", exact=True)
    prompt.wait_for(timeout=30000)
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea')?.value === 'a castle on a hill'",
                           timeout=30000)
    assert tab.get_by_label("Negative prompt").input_value() == "fog"
    assert tab.get_by_label("Seed", exact=True).input_value() == "1234"
    assert tab.get_by_label("number input for Sampling steps").input_value() == "7"
    assert tab.get_by_label("number input for Width").input_value() == "128"
    assert tab.get_by_label("number input for Height").input_value() == "96"
    assert tab.get_by_label("number input for CFG Scale").input_value() == "5.5"
    assert tab.get_by_label("Sampling method").input_value() == "DPM++ 2M"
    assert tab.get_by_label("Schedule type").input_value() == "Karras"
    assert tab.get_by_label("Variation seed", exact=True).input_value() == "99"
    assert page.get_by_label("number input for Clip skip").input_value() == "2"


def test_the_extras_tab_upscales_a_picture(page, tmp_path):
    """A1111's Extras tab: a picture, an upscaler (PIL's and the server's upscaler models), a scale."""
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "small.png")
    page.get_by_role("tab", name="Extras").click()
    page.locator("#extras_image input[type=file]").set_input_files(str(tmp_path / "small.png"))
    page.locator("#extras_image img").first.wait_for(timeout=30000)
    page.locator("#extras_generate").click()
    page.wait_for_function("t => document.querySelector('#extras_info textarea')?.value.includes(t)",
                           arg="Postprocess upscale by: 2, Postprocess upscaler: Lanczos", timeout=30000)
    page.locator("#extras_result img").first.wait_for(timeout=30000)


def start_a_long_generation(page, prompt: str) -> None:
    """Minutes of steps (three batches of 150 at 512 px), running once its first batch shows progress."""
    tab = page.locator("#tab_txt2img")
    tab.get_by_label("Prompt", exact=True).fill(prompt)
    for label, value in (("Sampling steps", 150), ("Width", 512), ("Height", 512), ("Batch count", 3)):
        set_number(tab, label, value)
    page.locator("#txt2img_generate").click()
    wait_progress(page, "txt2img", "Batch 1 of 3, step", timeout=60000)


def test_interrupt_stops_a_running_generation_while_progress_and_preview_move(page):
    start_a_long_generation(page, "a long one")
    page.locator("#txt2img_preview img").wait_for(timeout=30000)  # the live preview, from the server's loop
    first = progress_text(page, "txt2img")
    page.wait_for_function("t => document.querySelector('#txt2img_progress .sdtrt-progress-text').innerText !== t",
                           arg=first, timeout=30000)  # the steps move
    start = time.monotonic()
    page.locator("#txt2img_interrupt").click()
    wait_progress(page, "txt2img", "Interrupted: 0 images kept", timeout=30000)
    assert time.monotonic() - start < 15
    assert page.locator("#txt2img_gallery button.thumbnail-item img").count() == 0


def test_closing_the_page_stops_its_generation_on_the_server(site, server):
    """A browser that goes away mid-generation leaves nothing running: the page interrupts its job, so the
    server's U-Net stops being called within seconds (the generation asked for minutes of steps)."""
    page = open_page(site)
    start_a_long_generation(page, "a long one, then gone")
    running = answered(server, "default__unet")
    time.sleep(1.0)
    assert answered(server, "default__unet") > running  # its steps are running on the server
    page.close()
    deadline, quiet = time.monotonic() + 20, False
    while time.monotonic() < deadline and not quiet:
        before = answered(server, "default__unet")
        time.sleep(2.0)
        quiet = answered(server, "default__unet") == before
    assert quiet, "the server kept running the closed page's steps"
