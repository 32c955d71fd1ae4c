"""A1111's face restoration: faces found, cut out aligned, redrawn by GFPGAN or CodeFormer and pasted back, as
A1111 1.10 runs it (modules/face_restoration_utils.py restore_with_face_helper over facexlib 0.3's
FaceRestoreHelper with upscale_factor 1, face_size 512, the RetinaFace ResNet-50 detector and face parsing).

The three networks are callables here (``FaceNetworks``): the job runs them on Triton, the in-process runner on
its sessions, tests on the torch modules. Around them, A1111's rules, step by step:
  * the picture, its short side resized to 640 (Lanczos), goes to the detector; its anchors are decoded (RetinaFace's
    priors and variances), kept above a score of 0.97, and overlapping ones dropped (IoU over 0.4);
  * a face whose eyes are under 5 pixels apart is skipped; each other one is warped onto FFHQ's five-point template
    (OpenCV's LMedS similarity transform) into a 512 x 512 crop, grey where the picture ends;
  * the crop, RGB in [-1, 1], is restored; the result clamped and truncated to 8 bits;
  * it is warped back and blended in through the face parser's mask (skin, brows, eyes, nose, mouth; blurred twice),
    each face over the picture so far.

OpenCV does the resizing, warping and blurring, as in A1111, so that the pixels agree; it is imported where it is
used, since a client-only install of the other postprocessing steps does not need it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from sdtrt.contract.errors import InvalidRequest, UsageError
from sdtrt.contract.spec import (FACE_DETECT_H, FACE_DETECT_SHORT_SIDE, FACE_DETECT_SIDES, FACE_DETECTOR, FACE_PARSER,
                                FACE_SIZE, ModelSpec, face_restorer_component)

OPENCV = "opencv-python-headless==4.11.0.86"
SCORE_THRESHOLD, NMS_IOU, MIN_EYE_DISTANCE = 0.97, 0.4, 5  # facexlib's 0.97, detect_faces' 0.4, A1111's 5
# RetinaFace ResNet-50's anchors (facexlib's cfg_re50): sizes per feature map, its strides, the box variances
ANCHOR_SIZES, ANCHOR_STEPS, VARIANCES = ((16, 32), (64, 128), (256, 512)), (8, 16, 32), (0.1, 0.2)
# FFHQ's five landmarks in a 512 x 512 face (facexlib's face_template): eyes, nose, mouth corners
FACE_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]]) * (FACE_SIZE / 512.0)
CROP_BORDER = (135, 133, 132)  # the grey outside the picture in a crop (BGR)
# Face parsing's 19 classes -> kept (255) or not (0): background, neck, cloth and hat are not pasted
MASK_COLOURS = np.array([0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 0, 255, 0, 0, 0], np.float64)
MASK_BLUR, MASK_SIGMA, MASK_EDGE = 101, 11, 10
# Bounds A1111 does not have: the faces restored in one picture (each one a restorer call; a crowd's likeliest 32),
# and the picture's size (the paste holds two float copies of it: 16 Mpixels are 768 MiB)
MAX_FACES, MAX_FACE_PIXELS = 32, 4096 * 4096

Detect = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]  # [1, 3, h, w] BGR 0..255 -> boxes
# [1, P, 4], scores [1, P], landmarks [1, P, 10] (the anchors' raw offsets)
Net = Callable[[np.ndarray], np.ndarray]  # [1, 3, 512, 512] float32 RGB in [-1, 1] -> labels [1, 512, 512] / a face


@dataclass(frozen=True)
class FaceNetworks:
    """The networks one restoration runs: facexlib's detector and parser, and the restorer (its weight bound)."""

    detect: Detect
    parse: Net
    restore: Net
    detect_range: tuple[int, int] = FACE_DETECT_SIDES  # the sides the detector takes (the spec's face_detect dims)


def _cv2() -> Any:
    try:
        import cv2  # (an optional library for a thin layer: the server install has it)
    except ImportError:
        raise UsageError(f"restoring faces needs OpenCV: pip install {OPENCV}") from None
    return cv2


def anchors(height: int, width: int) -> np.ndarray:
    """RetinaFace's priors for a picture of that size: [P, 4] as (cx, cy, w, h) relative to it, in its order
    (each feature map's rows, then columns, then the two anchor sizes)."""
    found = []
    for sizes, step in zip(ANCHOR_SIZES, ANCHOR_STEPS):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width,
                             indexing="ij")
        per_size = [np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], -1) for s in sizes]
        found.append(np.stack(per_size, 2).reshape(-1, 4))
    return np.concatenate(found).astype(np.float32)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression, highest score first (torchvision's nms, which facexlib calls)."""
    order, keep = np.argsort(-scores, kind="stable"), []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        lo, hi = np.maximum(boxes[best, :2], boxes[order, :2]), np.minimum(boxes[best, 2:], boxes[order, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        order = order[inter / (areas[best] + areas[order] - inter) <= iou]
    return np.array(keep, dtype=np.int64)


def detect_faces(picture: np.ndarray, detect: Detect, detect_range: tuple[int, int] = FACE_DETECT_SIDES) -> np.ndarray:
    """Faces in a BGR uint8 picture as [F, 15] rows (box x1 y1 x2 y2, score, five landmarks x y), in its pixels."""
    cv2 = _cv2()
    h, w = picture.shape[:2]
    scale = min(h, w) / FACE_DETECT_SHORT_SIDE
    dh, dw = int(h / scale), int(w / scale)
    if not (detect_range[0] <= min(dh, dw) and max(dh, dw) <= detect_range[1]):
        raise InvalidRequest("restore_faces", f"a {w}x{h} picture", f"false for a picture too narrow for the face "
                             f"detector (at a short side of {FACE_DETECT_SHORT_SIDE} its sides are {dw}x{dh}; at most "
                             f"{detect_range[1]})")
    resized = cv2.resize(picture, (dw, dh), interpolation=cv2.INTER_LANCZOS4).astype(np.float32)
    loc, scores, landmarks = detect(np.ascontiguousarray(resized.transpose(2, 0, 1)[None]))
    priors, (v0, v1) = anchors(dh, dw), VARIANCES
    loc, scores, landmarks = loc[0], scores[0], landmarks[0]
    centres = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:]
    sizes = priors[:, 2:] * np.exp(loc[:, 2:] * v1)
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1) * np.array([dw, dh, dw, dh], np.float32)
    points = (priors[:, None, :2] + landmarks.reshape(-1, 5, 2) * v0 * priors[:, None, 2:]).reshape(-1, 10)
    points = points * np.array([dw, dh] * 5, np.float32)
    kept = np.where(scores > SCORE_THRESHOLD)[0]
    boxes, scores, points = boxes[kept], scores[kept], points[kept]
    keep = _nms(boxes, scores, NMS_IOU)
    return np.concatenate([boxes[keep], scores[keep, None], points[keep]], 1) * scale


def _to_net(face: np.ndarray) -> np.ndarray:
    """A BGR uint8 crop as the networks take it: RGB in [-1, 1], [1, 3, 512, 512]."""
    rgb = (face / 255.0).astype(np.float32)[:, :, ::-1]
    return np.ascontiguousarray(((rgb - 0.5) / 0.5).transpose(2, 0, 1)[None])


def _from_net(face: np.ndarray) -> np.ndarray:
    rgb = (np.clip(face[0].astype(np.float32), -1, 1) + 1) / 2
    return (rgb.transpose(1, 2, 0)[:, :, ::-1] * 255.0).astype(np.uint8)


def _face_mask(restored: np.ndarray, parse: Net) -> np.ndarray:
    """The parser's mask of a restored 512 x 512 face, blurred, its border cleared, in [0, 1]."""
    cv2 = _cv2()
    face = cv2.resize(restored, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LINEAR)
    labels = np.asarray(parse(_to_net(face)))[0]
    mask = MASK_COLOURS[np.clip(labels, 0, len(MASK_COLOURS) - 1)]
    mask = cv2.GaussianBlur(cv2.GaussianBlur(mask, (MASK_BLUR, MASK_BLUR), MASK_SIGMA), (MASK_BLUR, MASK_BLUR), MASK_SIGMA)
    e = MASK_EDGE
    mask[:e, :], mask[-e:, :], mask[:, :e], mask[:, -e:] = 0, 0, 0, 0
    return cv2.resize(mask / 255.0, restored.shape[:2])


def _paste(result: np.ndarray, restored: np.ndarray, mask: np.ndarray, inverse: np.ndarray) -> None:
    """facexlib's paste of one face, mask * face + (1 - mask) * picture, in place (the same sums, with one
    picture-sized temporary instead of three). The warps span the whole picture, as facexlib's do: warping into
    the face's box alone would round OpenCV's fixed-point coordinates differently."""
    cv2 = _cv2()
    h, w = result.shape[:2]
    soft = cv2.warpAffine(mask, inverse, (w, h), flags=cv2.INTER_AREA)[:, :, None]
    result *= 1 - soft
    result += soft * cv2.warpAffine(restored, inverse, (w, h))


def restore_faces(image: Image.Image, nets: FaceNetworks) -> Image.Image:
    """The picture with each face the detector finds restored and pasted back (A1111's restore_with_face_helper);
    at most MAX_FACES of them, the likeliest first."""
    cv2 = _cv2()
    if image.width * image.height > MAX_FACE_PIXELS:
        raise InvalidRequest("restore_faces", f"a {image.width}x{image.height} picture",
                             f"false for a picture over {MAX_FACE_PIXELS} pixels (restore its faces before upscaling)")
    picture = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    h, w = picture.shape[:2]
    affines = []
    for face in detect_faces(picture, nets.detect, nets.detect_range):
        if np.linalg.norm([face[5] - face[7], face[6] - face[8]]) < MIN_EYE_DISTANCE:
            continue  # a side face, or one too small
        landmarks = np.array([[face[i], face[i + 1]] for i in range(5, 15, 2)])
        affines.append(cv2.estimateAffinePartial2D(landmarks, FACE_TEMPLATE, method=cv2.LMEDS)[0])
    result = cv2.resize(picture, (w, h), interpolation=cv2.INTER_LANCZOS4).astype(np.float64)
    for affine in affines[:MAX_FACES]:
        crop = cv2.warpAffine(picture, affine, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=CROP_BORDER)
        restored = _from_net(np.asarray(nets.restore(_to_net(crop))))
        _paste(result, restored, _face_mask(restored, nets.parse), cv2.invertAffineTransform(affine))
    return Image.fromarray(np.ascontiguousarray(result.astype(np.uint8)[:, :, ::-1]))


def blend_restored(image: Image.Image, nets: FaceNetworks, visibility: float) -> Image.Image:
    """Extras' GFPGAN / CodeFormer step: the restored picture blended over the picture at ``visibility``."""
    restored = restore_faces(image, nets)
    return restored if visibility >= 1.0 else Image.blend(image.convert("RGB"), restored, visibility)


RunNetwork = Callable[[str, list[np.ndarray]], dict[str, np.ndarray]]  # component, its inputs -> outputs by name


def face_networks(spec: ModelSpec, restorer: str, weight: float, run: RunNetwork) -> FaceNetworks:
    """The face networks of a model exported with --face-restorers, each called through ``run`` (Triton from the
    job or a client, the in-process runner's sessions); ``weight``: CodeFormer's fidelity."""
    entry = spec.face_restorers[restorer]
    names = (FACE_DETECTOR, FACE_PARSER, face_restorer_component(entry["slug"]))
    detector, parser, net = (spec.component(name) for name in names)

    def detect(picture: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = run(detector.name, [picture])
        return tuple(out[t.name] for t in detector.outputs)  # (boxes, scores, landmarks)

    def parse(face: np.ndarray) -> np.ndarray:
        return run(parser.name, [face])[parser.outputs[0].name]

    def restore(face: np.ndarray) -> np.ndarray:
        extra = [np.full(1, weight, np.float32)] if len(net.inputs) > 1 else []  # (CodeFormer's fidelity)
        return run(net.name, [face, *extra])[net.outputs[0].name]

    sides = spec.dims[FACE_DETECT_H]
    return FaceNetworks(detect, parse, restore, (sides.min, sides.max))


@dataclass(frozen=True)
class ExtrasFaces:
    """Extras' face steps (A1111's postprocessing scripts GFPGAN, order 2000, and CodeFormer, 3000: after the
    upscale), each off at visibility 0."""

    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0

    def restorers(self) -> list[str]:
        return [name for name, v in (("GFPGAN", self.gfpgan_visibility), ("CodeFormer", self.codeformer_visibility))
                if v > 0]

    @classmethod
    def checked(cls, gfpgan_visibility: Any, codeformer_visibility: Any, codeformer_weight: Any,
                registered: tuple[str, ...]) -> "ExtrasFaces":
        """The steps, each share a number from 0 to 1 and each step that is on one of the ``registered``
        restorers (the server's), or InvalidRequest naming A1111's field."""
        values = {"gfpgan_visibility": gfpgan_visibility, "codeformer_visibility": codeformer_visibility,
                  "codeformer_weight": codeformer_weight}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise InvalidRequest(name, value, "a number from 0 to 1")
        steps = cls(*(float(v) for v in values.values()))
        for restorer in steps.restorers():
            if restorer not in registered:
                field = f"{restorer.lower()}_visibility"
                raise InvalidRequest(field, values[field], f"0: the server has no {restorer} (its face restorers: "
                                     f"{', '.join(registered) or 'none'}; export with --face-restorers DIR)")
        return steps


def extras_faces(image: Image.Image, steps: ExtrasFaces, networks: Callable[[str, float], FaceNetworks]
                 ) -> tuple[Image.Image, dict[str, Any]]:
    """The picture after Extras' GFPGAN and CodeFormer steps, and what A1111 writes of them (its pp.info);
    ``networks(restorer, weight)`` gives a restorer's networks."""
    done: dict[str, Any] = {}
    if steps.gfpgan_visibility > 0:
        image = blend_restored(image, networks("GFPGAN", 0.0), steps.gfpgan_visibility)
        done["GFPGAN visibility"] = round(steps.gfpgan_visibility, 3)
    if steps.codeformer_visibility > 0:
        image = blend_restored(image, networks("CodeFormer", steps.codeformer_weight), steps.codeformer_visibility)
        done["CodeFormer visibility"] = round(steps.codeformer_visibility, 3)
        done["CodeFormer weight"] = round(steps.codeformer_weight, 3)
    return image, done
