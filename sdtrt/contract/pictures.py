"""Pictures that arrive from users (the A1111 gateway's base64 fields, the page's uploads), decoded within bounds.

A picture is work before it is pixels: a 40 kB PNG can claim 50,000 x 50,000 pixels, and Pillow would allocate
7.5 GB to decode it. So the encoded size is checked before decoding, the format is one of the three that
users send (PNG, JPEG, WebP; Pillow would otherwise try every format it knows, some with parsers that were
never meant for untrusted files), and the pixel count is read from the header and checked before a single pixel
is decoded. Each refusal is an :class:`InvalidRequest` naming the field, its limit and what to do.
"""

from __future__ import annotations

import binascii
import io
from pathlib import Path

from PIL import Image

from sdtrt.contract.errors import InvalidRequest

PICTURE_FORMATS = ("PNG", "JPEG", "WEBP")
# 16.7 megapixels: a 4096 x 4096 picture, 48 MiB as RGB. Larger than any size the models draw (up to 1536 a side)
# and than what hires fix or Extras start from; an upscale's own result is bounded separately (sdtrt.postprocessing.upscale).
MAX_PICTURE_PIXELS = 4096 * 4096
MAX_PICTURE_BYTES = 32 * 2**20  # an encoded picture (a 4096 x 4096 PNG of noise is ~48 MB; photos are far less)


def restrict_pillow(max_pixels: int = MAX_PICTURE_PIXELS) -> None:
    """Hold every ``Image.open`` of this process to open_picture's rules, for code that opens users' pictures
    itself (Gradio decodes the page's img2img picture with a plain ``Image.open``, every format tried): only
    PICTURE_FORMATS open, and a header of more than ``max_pixels`` is refused before any pixel is decoded. For a
    process that serves users' pictures and opens no other kind (saving in any format still works)."""
    Image.init()  # every plugin registered now: Pillow registers none again later (init() runs once)
    for name in [name for name in Image.OPEN if name not in PICTURE_FORMATS]:
        del Image.OPEN[name]
    # in place: Image.open tells "every format" by this very list (formats=None), and would look the others up
    Image.ID[:] = [name for name in Image.ID if name in PICTURE_FORMATS]
    # Pillow raises DecompressionBombError past twice MAX_IMAGE_PIXELS and only warns past it. Turning the warning
    # into an error would take a process-wide filter, which warnings.catch_warnings() (Gradio's, while it converts
    # a picture) swaps out for every thread: half the limit makes Pillow's own error the limit, in every thread.
    Image.MAX_IMAGE_PIXELS = max_pixels // 2


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def base64_limit(max_bytes: int = MAX_PICTURE_BYTES) -> int:
    """The longest base64 text that can hold ``max_bytes`` (with a data: URL's prefix and some line breaks)."""
    return (max_bytes + 2) // 3 * 4 + 4096


def picture_bytes_from_base64(data: str, field: str, max_bytes: int = MAX_PICTURE_BYTES) -> bytes:
    """The bytes of a base64 picture (a ``data:image/...;base64,`` URL too), its length checked before decoding."""
    if not isinstance(data, str) or not data:
        raise InvalidRequest(field, data if not isinstance(data, str) else "", "a base64-encoded PNG, JPEG or WebP picture")
    if len(data) > base64_limit(max_bytes):
        raise InvalidRequest(field, f"<{len(data)} characters of base64>",
                             f"at most {_megabytes(max_bytes)} of picture ({base64_limit(max_bytes)} characters of "
                             "base64); send a smaller or more compressed picture (JPEG or WebP)")
    if data.startswith("data:") and "," in data[:200]:
        data = data.split(",", 1)[1]
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, f"<{len(data)} characters>", "a base64-encoded PNG, JPEG or WebP picture "
                             "(this is not valid base64)") from None


def open_picture(source: bytes | str | Path, field: str, *, max_pixels: int = MAX_PICTURE_PIXELS,
                 max_bytes: int = MAX_PICTURE_BYTES) -> Image.Image:
    """A picture (its bytes, or a file's path) decoded into memory with its text chunks in ``.info``; refused
    before decoding when it is too large, not PNG/JPEG/WebP, or broken."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError:
            raise InvalidRequest(field, path.name, "a picture file that exists") from None
        if size > max_bytes:
            raise InvalidRequest(field, f"<{size} bytes>", f"at most {_megabytes(max_bytes)} of picture")
        raw = path.read_bytes()
    else:
        raw = bytes(source)
    if len(raw) > max_bytes:
        raise InvalidRequest(field, f"<{len(raw)} bytes>", f"at most {_megabytes(max_bytes)} of picture")
    what = f"a PNG, JPEG or WebP picture of at most {max_pixels:,} pixels"
    try:
        # formats=: Pillow tries only these decoders; Image.open reads the header alone, so the size is known
        # before any pixel is decoded. (Pillow's own bomb check raises for pictures twice its MAX_IMAGE_PIXELS.)
        image = Image.open(io.BytesIO(raw), formats=PICTURE_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidRequest(field, "<a picture of more pixels than Pillow will decode>", what) from None
    except Exception:
        raise InvalidRequest(field, f"<{len(raw)} bytes>", f"{what} (this is not one, or it is damaged)") from None
    with image:
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise InvalidRequest(field, f"<{image.width}x{image.height} {image.format} picture>",
                                 f"{what}: make it smaller (e.g. at most {int(max_pixels ** 0.5)} x "
                                 f"{int(max_pixels ** 0.5)}) before sending it")
        try:
            image.load()  # the first frame only (an animated WebP or APNG is read as its first picture)
        except Exception:
            raise InvalidRequest(field, f"<{image.width}x{image.height} {image.format} picture>",
                                 f"{what} (this one is truncated or damaged)") from None
        return image  # loaded: its pixels and text chunks outlive the closed file
