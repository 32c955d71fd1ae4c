"""Pictures made of pictures, laid out as A1111 lays them out: grids (Prompt matrix, X/Y/Z plot, Loopback) with
their labels, and the overlapping tiles SD upscale redraws one by one and blends back together.

Where the layout is A1111's (a grid's columns and rows, where each tile sits, how the overlaps fade) it is
followed exactly, so a picture cut and put back by sdtrt is the one A1111 would make from the same tiles. The
labels are drawn with Pillow's own font (A1111 ships Roboto), so their pixels, and the margin they take, differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Label", "Tiles", "annotate_grid", "combine_tiles", "image_grid", "split_tiles"]


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """``images`` (one size) in ``rows`` rows, left to right then top to bottom, on black (A1111's image_grid)."""
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for i, image in enumerate(images):
        grid.paste(image, (i % cols * width, i // cols * height))
    return grid


@dataclass
class Label:
    """One line over a column or beside a row; an inactive one (a prompt matrix's part left out) is struck out."""

    text: str = ""
    active: bool = True
    size: tuple[int, int] = (0, 0)


def _wrapped(draw: ImageDraw.ImageDraw, labels: list[Label], font, width: float) -> list[Label]:
    """Each label broken into lines no wider than ``width``, word by word."""
    lines: list[Label] = []
    for label in labels:
        words, current = label.text.split(), ""
        parts = []
        for word in words:
            candidate = f"{current} {word}".strip()
            if draw.textlength(candidate, font=font) <= width or not current:
                current = candidate
            else:
                parts.append(current)
                current = word
        parts.append(current)
        for part in parts:
            box = draw.multiline_textbbox((0, 0), part, font=font)
            lines.append(Label(part, label.active, (box[2] - box[0], box[3] - box[1])))
    return lines


def annotate_grid(grid: Image.Image, width: int, height: int, columns: list[list[Label]], rows: list[list[Label]],
                  margin: int = 0) -> Image.Image:
    """A grid of ``width`` x ``height`` cells with a label block over each column and beside each row, the cells
    ``margin`` pixels apart, on white (A1111's draw_grid_annotations: font size (width + height) // 25, the row
    labels a column three quarters of a cell wide when any says something)."""
    size = (width + height) // 25
    spacing = size // 2
    font = ImageFont.load_default(size=size)
    n_cols, n_rows = grid.width // width, grid.height // height
    if (len(columns), len(rows)) != (n_cols, n_rows):
        raise ValueError(f"{len(columns)} column and {len(rows)} row labels for a {n_cols}x{n_rows} grid")
    pad_left = width * 3 // 4 if any(label.text for labels in rows for label in labels) else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1), "white"))
    columns = [_wrapped(measure, labels, font, width) for labels in columns]
    rows = [_wrapped(measure, labels, font, pad_left) for labels in rows]
    column_heights = [sum(line.size[1] + spacing for line in lines) - spacing for lines in columns]
    row_heights = [sum(line.size[1] for line in lines) for lines in rows]
    pad_top = max(column_heights) + spacing * 2
    result = Image.new("RGB", (grid.width + pad_left + margin * (n_cols - 1),
                               grid.height + pad_top + margin * (n_rows - 1)), "white")
    for row in range(n_rows):
        for col in range(n_cols):
            cell = grid.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    draw = ImageDraw.Draw(result)

    def lines_at(x: float, y: float, lines: list[Label]) -> None:
        for line in lines:
            colour = (0, 0, 0) if line.active else (153, 153, 153)
            draw.multiline_text((x, y + line.size[1] / 2), line.text, font=font, fill=colour, anchor="mm",
                                align="center")
            if not line.active:
                draw.line((x - line.size[0] // 2, y + line.size[1] // 2, x + line.size[0] // 2,
                           y + line.size[1] // 2), fill=colour, width=4)
            y += line.size[1] + spacing

    for col, lines in enumerate(columns):
        lines_at(pad_left + (width + margin) * col + width / 2, pad_top / 2 - column_heights[col] / 2, lines)
    for row, lines in enumerate(rows):
        lines_at(pad_left / 2, pad_top + (height + margin) * row + height / 2 - row_heights[row] / 2, lines)
    return result


@dataclass
class Tiles:
    """A picture cut into ``tile_w`` x ``tile_h`` tiles that overlap by ``overlap`` pixels: ``rows`` of
    (y, [(x, tile), ...])."""

    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int
    rows: list[tuple[int, list[tuple[int, Image.Image]]]] = field(default_factory=list)

    @property
    def pictures(self) -> list[Image.Image]:
        return [tile for _, row in self.rows for _, tile in row]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where A1111's split_grid starts each tile along one side: as many as cover it with ``overlap`` pixels
    shared, spread evenly, the last flush with the end."""
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1) if count > 1 else 0
    return [min(int(i * step), length - tile) for i in range(count)]


def split_tiles(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> Tiles:
    """``image`` (no smaller than a tile; ``overlap`` below the tile's sides) cut as A1111's SD upscale cuts it."""
    tiles = Tiles(tile_w, tile_h, image.width, image.height, overlap)
    for y in tile_starts(image.height, tile_h, overlap):
        tiles.rows.append((y, [(x, image.crop((x, y, x + tile_w, y + tile_h)))
                               for x in tile_starts(image.width, tile_w, overlap)]))
    return tiles


def _ramp(overlap: int, length: int, vertical: bool) -> Image.Image:
    """A mask that fades in across the overlap (0 at its first pixel, as A1111's combine_grid)."""
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    array = np.repeat(ramp[:, None], length, axis=1) if vertical else np.repeat(ramp[None, :], length, axis=0)
    return Image.fromarray(array, "L")


def combine_tiles(tiles: Tiles, pictures: list[Image.Image]) -> Image.Image:
    """``pictures`` (the redrawn tiles, in ``tiles.pictures``' order) put back where their tiles were, each
    fading in over the one before across the overlap: along each row first, then the rows over each other."""
    redrawn = iter(pictures)
    overlap = tiles.overlap
    combined = Image.new("RGB", (tiles.image_w, tiles.image_h))
    for y, row in tiles.rows:
        strip = Image.new("RGB", (tiles.image_w, tiles.tile_h))
        for x, _ in row:
            tile = next(redrawn)
            if x == 0 or overlap == 0:
                strip.paste(tile, (x, 0))
                continue
            strip.paste(tile.crop((0, 0, overlap, tiles.tile_h)), (x, 0), mask=_ramp(overlap, tiles.tile_h, False))
            strip.paste(tile.crop((overlap, 0, tiles.tile_w, tiles.tile_h)), (x + overlap, 0))
        if y == 0 or overlap == 0:
            combined.paste(strip, (0, y))
            continue
        combined.paste(strip.crop((0, 0, tiles.image_w, overlap)), (0, y), mask=_ramp(overlap, tiles.image_w, True))
        combined.paste(strip.crop((0, overlap, tiles.image_w, tiles.tile_h)), (0, y + overlap))
    return combined
