"""Saving images the way AUTOMATIC1111 does: ``00001-<seed>.png`` with the infotext in a ``parameters`` chunk."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from sdtrt.contract.errors import DiskFull
from sdtrt.contract.files import write_atomic

_NUMBERED = re.compile(r"^(\d+)-")


def png_info(infotext: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return info


def next_number(out_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=0) + 1


def save_png(image: np.ndarray, seed: int, infotext: str, out_dir: str | Path) -> Path:
    """Write one HxWx3 uint8 image under the next free number; never overwrites an existing file, and never
    leaves a partial one: the PNG is encoded first, then written aside, fsynced and linked into place
    (sdtrt.contract.files). A full disk raises DiskFull."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG", pnginfo=png_info(infotext))
    number = next_number(out)
    while True:
        path = out / f"{number:05d}-{seed}.png"
        try:
            return write_atomic(path, buffer.getvalue(), exclusive=True)  # a concurrent writer: take the next number
        except FileExistsError:
            number += 1


def disk_full_summary(exc: DiskFull) -> str:
    """How much a write that failed for space needed and how much was free, without the server's paths."""
    need = f"{exc.needed:,} bytes needed" if exc.needed is not None else "more space needed"
    return f"{need}, {exc.free:,} bytes free" if exc.free is not None else need


def read_infotext(path: str | Path) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")
