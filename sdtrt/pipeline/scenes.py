"""Procedural scenes with captions: what the embedded default model is trained on, and what its tests ask for.

A scene is one coloured shape (circle, square or triangle; small or large; at one of five places) on a plain
background. Its caption names what it shows, with parts left out at random ("a red circle", "a small blue
square at the top left on a yellow background") so that the model also learns what to draw when a prompt leaves
something open, and an empty caption now and then so that classifier-free guidance has an unconditional model.
Everything is deterministic from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels a side: the model's native size

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 65, 220),
    "yellow": (240, 215, 35),
    "purple": (140, 45, 175),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 9, "large": 17}  # half the shape's width, in pixels
# where the shape's centre is (x, y in pixels), and the words that say so
PLACES: dict[str, tuple[int, int]] = {
    "at the top left": (18, 18),
    "at the top right": (46, 18),
    "at the bottom left": (18, 46),
    "at the bottom right": (46, 46),
    "in the center": (32, 32),
}
# how often a caption leaves each part out (the picture still has one)
OMIT = {"colour": 0.15, "size": 0.5, "place": 0.35, "background": 0.3}
EMPTY_CAPTION = 0.1


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    place: str
    background: str
    jitter: tuple[int, int] = (0, 0)

    @property
    def centre(self) -> tuple[int, int]:
        x, y = PLACES[self.place]
        return x + self.jitter[0], y + self.jitter[1]

    def caption(self, omit: frozenset[str] = frozenset()) -> str:
        words = ["a"]
        if "size" not in omit:
            words.append(self.size)
        if "colour" not in omit:
            words.append(self.colour)
        words.append(self.shape)
        if "place" not in omit:
            words.append(self.place)
        if "background" not in omit:
            words.append(f"on a {self.background} background")
        return " ".join(words)

    def mask(self) -> np.ndarray:
        """bool [SIZE, SIZE]: where the shape is."""
        canvas = Image.new("L", (SIZE, SIZE), 0)
        draw = ImageDraw.Draw(canvas)
        x, y = self.centre
        r = SIZES[self.size]
        if self.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        elif self.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=255)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=255)
        return np.asarray(canvas) > 127

    def render(self) -> np.ndarray:
        """uint8 [SIZE, SIZE, 3]."""
        picture = np.empty((SIZE, SIZE, 3), np.uint8)
        picture[:] = COLOURS[self.background]
        picture[self.mask()] = COLOURS[self.colour]
        return picture


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    jitter = tuple(int(v) for v in rng.integers(-3, 4, size=2))
    return Scene(shape=str(rng.choice(SHAPES)), colour=str(colour), size=str(rng.choice(list(SIZES))),
                 place=str(rng.choice(list(PLACES))), background=str(background), jitter=jitter)


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    if rng.random() < EMPTY_CAPTION:
        return ""
    return scene.caption(frozenset(part for part, p in OMIT.items() if rng.random() < p))


def dataset(count: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``count`` scenes from ``seed``: uint8 pictures [count, SIZE, SIZE, 3] and the scenes."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    return np.stack([s.render() for s in scenes]), scenes


def colour_share(picture: np.ndarray, colour: str, where: np.ndarray | None = None, tolerance: float = 80.0) -> float:
    """The share of pixels (inside ``where``, if given) whose colour is within ``tolerance`` (RGB distance) of the
    named colour: how the tests read a picture."""
    pixels = picture.reshape(-1, 3).astype(np.float32)
    if where is not None:
        pixels = pixels[where.reshape(-1)]
    distance = np.linalg.norm(pixels - np.array(COLOURS[colour], np.float32), axis=1)
    return float((distance < tolerance).mean()) if len(pixels) else 0.0
