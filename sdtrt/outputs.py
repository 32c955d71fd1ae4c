"""Saving images the way AUTOMATIC1111 does: ``00001-<seed>.png`` with the infotext in a ``parameters`` chunk."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

_NUMBERED = re.compile(r"^(\d+)-")


def png_info(infotext: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    return info


def next_number(out_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=0) + 1


def save_png(image: np.ndarray, seed: int, infotext: str, out_dir: str | Path) -> Path:
    """Write one HxWx3 uint8 image under the next free number; never overwrites an existing file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    number = next_number(out)
    while True:
        path = out / f"{number:05d}-{seed}.png"
        try:
            with open(path, "xb") as f:  # exclusive create: a concurrent writer makes us take the next number
                pil.save(f, format="PNG", pnginfo=png_info(infotext))
            return path
        except FileExistsError:
            number += 1


def read_infotext(path: str | Path) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")
