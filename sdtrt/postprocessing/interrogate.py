"""A1111's interrogators at work on a picture: DeepBooru's tags as its caption (modules/deepbooru.py tag_multi),
the network itself a callable (``Run``: the picture in, each tag's probability out), on the server for the
gateway.

A1111's rules, kept: the picture resized to 512 x 512 by its resize_image mode 2 ("Resize and fill": scaled to fit
with Lanczos, centred, the bands left above and below (or beside) it filled by stretching its edge rows (or
columns)), as float32 / 255; tags at or above the score threshold, "rating:" ones left out, sorted by name (or by
probability, highest first), the filtered ones dropped, underscores as spaces, ``\\``, ``(`` and ``)`` escaped,
and with its option for ranks, each written ``(tag:0.123)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

DEEPBOORU = "deepdanbooru"  # A1111's name for it (/interrogate's model), and its network's
DEEPBOORU_SIZE = 512
Run = Callable[[np.ndarray], np.ndarray]  # [1, 512, 512, 3] float32 in [0, 1] -> [1, tags]
_SPECIAL = re.compile(r"([\\()])")


@dataclass(frozen=True)
class DeepBooruOptions:
    """A1111's options for its DeepBooru captions, with its defaults."""

    threshold: float = 0.5  # interrogate_deepbooru_score_threshold
    sort_alpha: bool = True  # deepbooru_sort_alpha
    use_spaces: bool = True  # deepbooru_use_spaces
    escape: bool = True  # deepbooru_escape
    ranks: bool = False  # interrogate_return_ranks
    filter_tags: str = ""  # deepbooru_filter_tags

    @classmethod
    def of(cls, options: dict) -> "DeepBooruOptions":
        """From A1111's option keys (missing ones: its defaults)."""
        d = cls()
        return cls(float(options.get("interrogate_deepbooru_score_threshold", d.threshold)),
                   bool(options.get("deepbooru_sort_alpha", d.sort_alpha)),
                   bool(options.get("deepbooru_use_spaces", d.use_spaces)),
                   bool(options.get("deepbooru_escape", d.escape)), bool(options.get("interrogate_return_ranks", d.ranks)),
                   str(options.get("deepbooru_filter_tags", d.filter_tags)))


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize_image(2, ...): the picture scaled to fit inside, centred, the bands beside it stretched from
    its edges."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio and (fill := height // 2 - src_h // 2) > 0:
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio and (fill := width // 2 - src_w // 2) > 0:
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return out


def deepbooru_tags(image: Image.Image, run: Run, tags: Sequence[str], options: DeepBooruOptions = DeepBooruOptions()
                   ) -> str:
    """A1111's DeepBooru caption of ``image`` (its tag(): the options' ranks)."""
    picture = resize_and_fill(image.convert("RGB"), DEEPBOORU_SIZE, DEEPBOORU_SIZE)
    probabilities = run(np.expand_dims(np.array(picture, dtype=np.float32), 0) / 255)[0]
    found = {tag: float(p) for tag, p in zip(tags, probabilities) if p >= options.threshold
             and not tag.startswith("rating:")}
    ordered = sorted(found) if options.sort_alpha else [t for t, _ in sorted(found.items(), key=lambda kv: -kv[1])]
    dropped = {t.strip().replace(" ", "_") for t in options.filter_tags.split(",")}
    out = []
    for tag in (t for t in ordered if t not in dropped):
        text = tag.replace("_", " ") if options.use_spaces else tag
        text = _SPECIAL.sub(r"\\\1", text) if options.escape else text
        out.append(f"({text}:{found[tag]:.3f})" if options.ranks else text)
    return ", ".join(out)
