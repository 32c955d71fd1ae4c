"""sd-webui-controlnet's preprocessors that need no model file, and how a control map fits the generation's size.

Each preprocessor takes the unit's picture (uint8 [H, W, 3]) at its processor resolution (the short side, the
picture padded to multiples of 64 by its edge pixels while it runs, as the extension's ``resize_image_with_pad``
does) and gives the control map. ``resize_map`` fits a map to a pass's size by the unit's resize mode, with the
extension's "high quality" resize: nearest for maps of a few colours (segmentation), area when shrinking, cubic
when growing, and binary maps (edges, scribbles) thresholded again after the resize. The preprocessors that need a
model (openpose, depth, ...) are not served: a unit naming one is refused naming it.

OpenCV does the pixel work, as in the extension; it is imported only where a map is made (a client's install
checks units without it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np


if TYPE_CHECKING:
    from sdtrt.requests.controlnet import ControlUnit


def _cv2():
    # OpenCV only where a control map is made (the job's plan, the gateway's /controlnet/detect)
    import cv2

    return cv2


def hwc3(picture: np.ndarray) -> np.ndarray:
    """A picture as 3 uint8 channels (grey repeated; RGBA over white, as the extension's HWC3)."""
    x = picture if picture.ndim == 3 else picture[:, :, None]
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    if x.shape[2] == 4:
        colour, alpha = x[:, :, :3].astype(np.float32), x[:, :, 3:4].astype(np.float32) / 255.0
        return (colour * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x


def _pad64(size: int) -> int:
    return int(np.ceil(float(size) / 64.0) * 64 - size)


def resize_with_pad(picture: np.ndarray, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The picture with its short side at ``resolution`` (cubic up, area down), padded on the bottom and right to
    multiples of 64 by its edge pixels; and the function that takes the padding off a map of it."""
    cv2 = _cv2()
    img = hwc3(picture)
    h, w = img.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(img, [[0, _pad64(th)], [0, _pad64(tw)], [0, 0]], mode="edge")
    return np.ascontiguousarray(padded), lambda x: np.ascontiguousarray(x[:th, :tw])


Slider = tuple[float, float, float]  # (minimum, maximum, default), as the extension's PreprocessorParameter
HIDDEN: Slider = (0, 1, 0.5)  # the extension's slider a preprocessor does not show (its bound check still runs)
RESOLUTION: Slider = (64, 2048, 512)


@dataclass(frozen=True)
class Preprocessor:
    """One preprocessor: what it does, and its sliders (processor_res, threshold_a, threshold_b) as the extension
    bounds them: a value outside a slider's range becomes its default (of the default's own type)."""

    run: Callable[[np.ndarray, int, float, float], np.ndarray] | None  # (picture, resolution, a, b) -> map
    labels: tuple[str, str] = ("", "")  # the thresholds' slider labels (shown ones), for /controlnet/module_list
    resolution: Slider = RESOLUTION
    threshold_a: Slider = HIDDEN
    threshold_b: Slider = HIDDEN

    @property
    def sliders(self) -> tuple[Slider, Slider, Slider]:
        return self.resolution, self.threshold_a, self.threshold_b


def _canny(picture: np.ndarray, res: int, low: float, high: float) -> np.ndarray:
    img, unpad = resize_with_pad(picture, res)
    return unpad(_cv2().Canny(img, int(low), int(high)))


def _invert(picture: np.ndarray, res: int, a: float, b: float) -> np.ndarray:
    return 255 - hwc3(picture)


def _threshold(picture: np.ndarray, res: int, level: float, b: float) -> np.ndarray:
    """White where every channel is brighter than the level."""
    img, unpad = resize_with_pad(picture, res)
    out = np.zeros_like(img, dtype=np.uint8)
    out[np.min(img, axis=2) > level] = 255
    return unpad(out)


def _blur(picture: np.ndarray, res: int, sigma: float, b: float) -> np.ndarray:
    img, unpad = resize_with_pad(picture, res)
    return _cv2().GaussianBlur(unpad(img), (0, 0), float(sigma))  # (the padding off first, as the extension)


def _tile_resample(picture: np.ndarray, res: int, down: float, b: float) -> np.ndarray:
    """The picture made ``down`` times smaller (area), as the tile ControlNet reads it."""
    cv2 = _cv2()
    img = hwc3(picture)
    if down < 1.1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (int(float(w) / float(down)), int(float(h) / float(down))), interpolation=cv2.INTER_AREA)


def _scribble_xdog(picture: np.ndarray, res: int, threshold: float, b: float) -> np.ndarray:
    """A difference of Gaussians, thresholded: white lines on black."""
    cv2 = _cv2()
    img, unpad = resize_with_pad(picture, res)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(img, dtype=np.uint8)
    out[2 * (255 - dog) > threshold] = 255
    return unpad(out)


def _lineart_standard(picture: np.ndarray, res: int, a: float, b: float) -> np.ndarray:
    """Lines where the picture is darker than its blur ("lineart_standard (from white bg & black line)"), scaled by
    the median of the clear ones."""
    cv2 = _cv2()
    img, unpad = resize_with_pad(picture, res)
    x = img.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    clear = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(clear)) if clear.size else 16.0)
    return unpad((intensity * 127).clip(0, 255).astype(np.uint8))


PREPROCESSORS: dict[str, Preprocessor] = {  # (the legacy ones all get the default resolution slider: its quirk)
    "none": Preprocessor(None),
    "invert": Preprocessor(_invert, resolution=HIDDEN),
    "canny": Preprocessor(_canny, ("Low Threshold", "High Threshold"), RESOLUTION, (1, 255, 100), (1, 255, 200)),
    "threshold": Preprocessor(_threshold, ("Binarization Threshold", ""), RESOLUTION, (0, 255, 127)),
    "blur_gaussian": Preprocessor(_blur, ("Sigma", ""), RESOLUTION, (0.01, 64.0, 9.0)),
    "tile_resample": Preprocessor(_tile_resample, ("Down Sampling Rate", ""), RESOLUTION, (1.0, 8.0, 1.0)),
    "scribble_xdog": Preprocessor(_scribble_xdog, ("XDoG Threshold", ""), RESOLUTION, (1, 64, 32)),
    "lineart_standard": Preprocessor(_lineart_standard),
}


def bounded(unit: "ControlUnit") -> "ControlUnit":
    """The unit with its processor resolution and thresholds as the extension's bound check leaves them: each
    within its preprocessor's slider, else that slider's default (-1, the API's default, always becomes it)."""
    pre = PREPROCESSORS[unit.module]
    values = []
    for value, (lo, hi, default) in zip((unit.processor_res, unit.threshold_a, unit.threshold_b), pre.sliders):
        values.append(value if lo <= value <= hi else default)
    return replace(unit, processor_res=values[0], threshold_a=values[1], threshold_b=values[2])


def pixel_perfect_resolution(picture: np.ndarray, width: int, height: int, resize_mode: str) -> int:
    """The extension's "Pixel Perfect": the processor resolution at which the map lands at the generation's size
    (the picture's short side, scaled as the resize mode scales it)."""
    h, w = picture.shape[:2]
    k0, k1 = float(height) / float(h), float(width) / float(w)
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * float(min(h, w))))


def preprocess(unit: "ControlUnit", picture: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """The unit's control map of its picture (uint8 [H, W, 3]) for a generation of ``size`` (width, height)."""
    pre = PREPROCESSORS[unit.module]
    if pre.run is None:
        return hwc3(picture)
    unit = bounded(unit)
    res = pixel_perfect_resolution(picture, *size, unit.resize_mode) if unit.pixel_perfect else int(unit.processor_res)
    return hwc3(pre.run(picture, res, unit.threshold_a, unit.threshold_b))


def _unique_colours(x: np.ndarray) -> int:
    return len(np.unique(x.reshape(-1, x.shape[2]), axis=0))


def _rotations(*kernels: list[list[int]]) -> list[np.ndarray]:
    """Each 3x3 hit-or-miss kernel (1: set, -1: clear, 0: either) in its four rotations, rotation by rotation."""
    return [np.rot90(np.array(k, dtype=np.int32), turn) for turn in range(4) for k in kernels]


# lvmin's edge thinning (the extension's lvminthin.py): peel the pixels these patterns find until none is left,
# then prune the spurs' ends
_THINNING = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
_PRUNING = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def _peel(x: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """Clear, in place, the pixels each pattern matches in turn; whether any was."""
    cv2, changed = _cv2(), False
    for kernel in kernels:
        hits = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127)
        x[hits] = 0
        changed |= hits[0].shape[0] > 0
    return changed


def thin_edges(x: np.ndarray, prune: bool) -> np.ndarray:
    """Binary edges thinned to one pixel (at most 32 rounds), spurs pruned when the map grew."""
    for _ in range(32):
        if not _peel(x, _THINNING):
            break
    if prune:
        _peel(x, _PRUNING)
    return x


def edge_nms(x: np.ndarray) -> np.ndarray:
    """A pixel kept where it is the largest of its line in some direction (horizontal, vertical, both diagonals)."""
    cv2 = _cv2()
    lines = [np.array(k, dtype=np.uint8) for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                                    [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    y = np.zeros_like(x)
    for line in lines:
        np.putmask(y, cv2.dilate(x, kernel=line) == x, x)
    return y


def high_quality_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The extension's resize of a control map to ``size`` (width, height): nearest for maps of a few colours,
    area when shrinking, cubic when growing; a black-and-white map thresholded again (Otsu), its one-pixel edges
    kept one pixel wide."""
    cv2 = _cv2()
    width, height = size
    if (width, height) == (x.shape[1], x.shape[0]):
        return x
    smaller, bigger = width * height < x.shape[0] * x.shape[1], width * height > x.shape[0] * x.shape[1]
    colours = _unique_colours(x)
    binary = colours == 2 and int(x.min()) < 16 and int(x.max()) > 240
    one_pixel = False
    if binary:
        opened = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8)), np.ones((3, 3), np.uint8))
        one_pixel = np.where(opened < x)[0].shape[0] * 2 > np.where(x > 127)[0].shape[0]
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if binary:
        grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if one_pixel:
            grey = edge_nms(grey)
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        if one_pixel:
            grey = thin_edges(grey, bigger)
        y = np.stack([grey] * 3, axis=2)
    return y


def resize_map(detected: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """A control map fitted to ``width`` x ``height``: stretched ("Just Resize"), scaled to cover and cropped at the
    centre ("Crop and Resize"), or scaled to fit inside and the rest filled with its border's median colour
    ("Resize and Fill")."""
    if mode == "Just Resize":
        return high_quality_resize(detected, (width, height))
    old_h, old_w = float(detected.shape[0]), float(detected.shape[1])
    k0, k1 = float(height) / old_h, float(width) / old_w
    if mode == "Resize and Fill":
        k = min(k0, k1)
        borders = np.concatenate([detected[0, :, :], detected[-1, :, :], detected[:, 0, :], detected[:, -1, :]], axis=0)
        background = np.tile(np.median(borders, axis=0).astype(detected.dtype)[None, None], [height, width, 1])
        fitted = high_quality_resize(detected, (int(np.round(old_w * k)), int(np.round(old_h * k))))
        new_h, new_w = fitted.shape[:2]
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        background[top:top + new_h, left:left + new_w] = fitted
        return background
    k = max(k0, k1)
    fitted = high_quality_resize(detected, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    new_h, new_w = fitted.shape[:2]
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return np.ascontiguousarray(fitted[top:top + height, left:left + width])
