"""The Extras upscale is bounded before it allocates: results and intermediates over the limits are refused naming
A1111's field, and a crop makes only the part of the scaled picture that survives it. Normal requests give the
same pixels as A1111's way of doing it (the algorithm sdtrt had before, kept here as the reference)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from sdtrt.postprocessing import upscale
from sdtrt.contract.errors import InvalidRequest
from sdtrt.postprocessing.upscale import (MAX_SIDE, MAX_UPSCALE_PIXELS, ExtrasUpscale, check_upscale, extras_upscale,
                           intermediate_size, output_size)


def reference_upscale(image: Image.Image, job: ExtrasUpscale) -> Image.Image:
    """A1111's Extras upscale as sdtrt did it before: the whole scaled picture, then the crop."""
    def one(name: str, scale: float) -> Image.Image:
        width, height = int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)
        out = image.resize((int(image.width * scale), int(image.height * scale)),
                           resample=upscale.EXTRAS_UPSCALERS[name].resample)
        return out if out.size == (width, height) else out.resize((width, height), resample=Image.Resampling.LANCZOS)

    if job.upscaler_1 == "None":
        return image
    scale = max(job.width / image.width, job.height / image.height) if job.resize_mode == 1 else job.scale
    out = one(job.upscaler_1, scale)
    if job.upscaler_2 != "None" and job.upscaler_2_visibility > 0:
        out = Image.blend(out, one(job.upscaler_2, scale), job.upscaler_2_visibility)
    if job.resize_mode == 1 and job.crop:
        canvas = Image.new("RGB", (job.width, job.height))
        canvas.paste(out, box=(job.width // 2 - out.width // 2, job.height // 2 - out.height // 2))
        out = canvas
    return out


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


NORMAL = [
    ((64, 64), ExtrasUpscale("Lanczos", scale=1.7)),
    ((64, 48), ExtrasUpscale("Nearest", scale=2)),
    ((64, 64), ExtrasUpscale("Nearest", "Lanczos", 0.5, resize_mode=1, width=200, height=120)),
    ((64, 64), ExtrasUpscale("Lanczos", "Nearest", 0.3, resize_mode=1, width=200, height=120, crop=False)),
    ((30, 30), ExtrasUpscale("Lanczos", resize_mode=1, width=100, height=100)),  # rounded to 96: a black border
    ((40, 90), ExtrasUpscale("Nearest", resize_mode=1, width=333, height=101)),
    ((512, 512), ExtrasUpscale("Lanczos", scale=4)),
    ((64, 64), ExtrasUpscale()),  # "None": nothing to do
]


@pytest.mark.parametrize("size, job", NORMAL)
def test_normal_upscales_give_the_same_pixels_as_before(size, job):
    picture = noise(*size)
    out, _ = extras_upscale(picture, job)
    expected = reference_upscale(picture, job)
    assert out.size == expected.size == output_size(size, job)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("first, second", [("Nearest", "None"), ("Lanczos", "None"), ("Nearest", "Lanczos")])
@pytest.mark.parametrize("size, target", [((8, 512), (512, 512)), ((300, 12), (640, 200)), ((37, 91), (500, 333))])
def test_a_crop_made_part_by_part_matches_the_whole_picture_cropped(monkeypatch, first, second, size, target):
    """Forced onto the part-by-part path (as a request over the bound takes it), against the whole picture made and
    cropped: nearest neighbour picks the same source pixels (when no Lanczos step to a multiple of 8 follows); Lanczos
    is at most one level apart (the source box's positions are rounded differently)."""
    monkeypatch.setattr(upscale, "MAX_INTERMEDIATE_PIXELS", 0)
    monkeypatch.setattr(upscale, "CROP_STRIP_ROWS", 64)  # several strips
    picture = noise(*size, seed=1)
    job = ExtrasUpscale(first, second, 0.25, resize_mode=1, width=target[0], height=target[1])
    out, info = extras_upscale(picture, job)
    expected = reference_upscale(picture, job)
    assert out.size == target and info["Postprocess crop to"] == f"{target[0]}x{target[1]}"
    difference = np.abs(np.asarray(out).astype(int) - np.asarray(expected).astype(int))
    if first == "Nearest" and second == "None" and intermediate_size(size, job) == upscale.scaled_size(size, job):
        assert difference.max() == 0
    assert difference.max() <= 1 and difference.mean() < 0.05


def test_nearest_parts_pick_the_pixels_pils_whole_resize_picks():
    for width, height, out_w, out_h in [(64, 8192, 8192, 1_048_576 // 64), (7, 5, 300, 2000), (333, 17, 8191, 63)]:
        picture = noise(width, height, seed=2)
        whole = np.asarray(picture.resize((out_w, out_h), Image.Resampling.NEAREST))
        for part in [(0, 0, out_w, out_h), (out_w // 3, out_h // 2, out_w - 1, out_h // 2 + 7)]:
            mine = upscale._resize_part(picture, Image.Resampling.NEAREST, (out_w, out_h), part)
            assert np.array_equal(np.asarray(mine), whole[part[1]:part[3], part[0]:part[2]])


def test_a_thin_picture_cropped_to_the_largest_size_stays_within_a_gigabyte():
    """64 x 8192 to 8192 x 8192 with crop: A1111's way scales by 128 to 8192 x 1,048,576 pixels (24 GiB) first
    (on main this was killed for memory); made part by part, it costs what its result does."""
    script = textwrap.dedent("""
        import json, re, sys
        import numpy as np
        from PIL import Image
        from sdtrt.postprocessing.upscale import ExtrasUpscale, extras_upscale
        picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8192, 64, 3), dtype=np.uint8))
        job = ExtrasUpscale(sys.argv[1], sys.argv[2], 0.5, resize_mode=1, width=8192, height=8192, crop=True)
        out, info = extras_upscale(picture, job)
        middle = np.asarray(out.crop((0, 4000, 8192, 4001)))
        # VmHWM: this process's peak resident memory (ru_maxrss would count the parent's, kept across exec)
        peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
        print(json.dumps({"size": out.size, "peak_mib": peak / 1024,
                          "info": info, "mean": float(middle.mean())}))
    """)
    for first, second in (("Lanczos", "None"), ("Nearest", "Lanczos")):
        run = subprocess.run([sys.executable, "-c", script, first, second], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        result = json.loads(run.stdout)
        assert result["size"] == [8192, 8192] and result["info"]["Postprocess crop to"] == "8192x8192"
        assert 100 < result["mean"] < 155  # noise scaled up, not a black canvas
        assert result["peak_mib"] < 1024, result


@pytest.mark.parametrize("size, job, field", [
    ((4096, 4096), ExtrasUpscale("Lanczos", scale=8), "upscaling_resize"),
    ((64, 64), ExtrasUpscale("Lanczos", scale=1e300), "upscaling_resize"),
    ((64, 64), ExtrasUpscale("Lanczos", scale=math.inf), "upscaling_resize"),
    ((64, 64), ExtrasUpscale("Lanczos", scale=math.nan), "upscaling_resize"),
    ((64, 64), ExtrasUpscale("Lanczos", scale=0), "upscaling_resize"),
    ((4, 4), ExtrasUpscale("Lanczos", scale=1.5), "upscaling_resize"),  # 6x6, rounded down to 0x0
    ((64, 8192), ExtrasUpscale("Lanczos", resize_mode=1, width=8192, height=8192, crop=False), "upscaling_resize_w"),
    ((8192, 64), ExtrasUpscale("Lanczos", resize_mode=1, width=8192, height=8192, crop=False), "upscaling_resize_h"),
    ((64, 64), ExtrasUpscale("Lanczos", resize_mode=1, width=MAX_SIDE + 1, height=64), "upscaling_resize_w"),
    ((64, 64), ExtrasUpscale("Lanczos", resize_mode=1, width=4, height=4), "upscaling_resize_w"),
    ((64, 64), ExtrasUpscale("ESRGAN_4x"), "upscaler_1"),
])
def test_too_much_is_refused_naming_the_field_before_any_pixel(size, job, field):
    with pytest.raises(InvalidRequest) as refused:
        check_upscale(size, job)
    assert refused.value.field == field
    assert len(str(refused.value)) < 600


def test_refusals_say_the_size_and_the_limit():
    job = ExtrasUpscale("Lanczos", resize_mode=1, width=8192, height=8192, crop=False)
    with pytest.raises(InvalidRequest) as refused:
        check_upscale((64, 8192), job)
    message = str(refused.value)
    assert "8192x1.04858e+06 from 64x8192" in message or "8192x1048576 from 64x8192" in message
    assert f"at most {MAX_SIDE} pixels a side and {MAX_UPSCALE_PIXELS} pixels in all" in message
    assert "upscaling_crop" in message
    with pytest.raises(InvalidRequest, match="this makes 16384x16384 from 4096x4096"):
        check_upscale((4096, 4096), ExtrasUpscale("Lanczos", scale=4))


def test_extras_upscale_checks_too():
    with pytest.raises(InvalidRequest) as refused:
        extras_upscale(noise(64, 64), ExtrasUpscale("Lanczos", scale=1000))
    assert refused.value.field == "upscaling_resize"


def test_what_is_allowed_and_its_sizes():
    check_upscale((4096, 4096), ExtrasUpscale("Lanczos", scale=2))  # 8192 x 8192: the largest result
    check_upscale((64, 8192), ExtrasUpscale("Lanczos", resize_mode=1, width=8192, height=8192))  # with crop
    assert intermediate_size((64, 8192), ExtrasUpscale("Lanczos", resize_mode=1, width=8192, height=8192)) == \
        (8192, 1_048_576)
    assert output_size((64, 64), ExtrasUpscale("Lanczos", scale=1.7)) == (104, 104)
    assert output_size((64, 8192), ExtrasUpscale("Lanczos", resize_mode=1, width=8192, height=8192)) == (8192, 8192)
