"""Face restoration models (A1111's models/GFPGAN and models/Codeformer), each exported as a network of the model
it is registered with, beside the two networks A1111's face helper runs before and after them.

A1111 1.10 restores faces through facexlib's FaceRestoreHelper: RetinaFace (ResNet-50) finds the faces and their
five landmarks, each face is cut to a 512 x 512 crop aligned to FFHQ's template, the restorer (GFPGAN or
CodeFormer, loaded by spandrel) redraws it, and ParseNet's face parsing masks it as it is pasted back. The
detector and parser are the files A1111 downloads into models/GFPGAN (detection_Resnet50_Final.pth,
parsing_parsenet.pth); here they are files the user supplies in the same folder, read by their layout.

The architectures come from the libraries A1111 runs: spandrel's GFPGAN, spandrel_extra_arches' CodeFormer and
facexlib's RetinaFace and ParseNet. facexlib is imported without its package ``__init__`` (which loads its
trackers and their requirements); its RetinaFace builds torchvision's ResNet-50 and IntermediateLayerGetter, given
here by a small stand-in with torchvision's layer names (PyPI's torchvision is a CUDA build, see upscalers.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import (FACE_DETECT_H, FACE_DETECT_SHORT_SIDE, FACE_DETECT_SIDES, FACE_DETECT_W, SINGLE,
                                FACE_DETECTOR, FACE_PARSER, FACE_PRIORS, FACE_SIZE, DimRange, TensorSpec,
                                face_restorer_component)
from sdtrt.export.networks.checkpoint import file_sha256, folder_files, read_weights
from sdtrt.export.networks.descriptors import Descriptor, OnePerCall
from sdtrt.export.upscalers import UPSCALER_SUFFIXES, spandrel
from sdtrt.pipeline.ksampling import standing_in, torchvision_stand_in, unexecuted_package

FACEXLIB, SPANDREL_EXTRA = "facexlib==0.3.0", "spandrel-extra-arches==0.2.0"  # (--no-deps, pyproject's no-deps)
MAX_FACE_FILES = 8
_SIDES = DimRange(FACE_DETECT_SIDES[0], FACE_DETECT_SHORT_SIDE, FACE_DETECT_SIDES[1])
DETECT_DIMS = {SINGLE: DimRange(1, 1, 1), FACE_DETECT_H: _SIDES, FACE_DETECT_W: _SIDES}
BGR_MEAN = (104.0, 117.0, 123.0)  # RetinaFace's input mean (facexlib's mean_tensor), subtracted in the network
RESTORERS = ("GFPGAN", "CodeFormer")  # spandrel's architecture ids, which are A1111's restorer names
_LOCK = threading.Lock()


# --- torchvision's ResNet-50, as facexlib's RetinaFace builds it (torchvision's module names: the file's keys) ----
class _Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ResNet50(nn.Module):
    def __init__(self, **_: Any):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layers = [_Bottleneck(inplanes, planes, stride)] + [_Bottleneck(planes * 4, planes, 1)
                                                                for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            inplanes = planes * 4


class _LayerOutputs(nn.ModuleDict):
    """torchvision's IntermediateLayerGetter: the backbone's children up to the last one asked for, run in turn,
    returning the outputs of those asked for under their new names."""

    def __init__(self, model: nn.Module, return_layers: dict[str, Any]):
        wanted, layers = dict(return_layers), OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            if name in wanted and all(n in layers for n in wanted):
                break
        super().__init__(layers)
        self.return_layers = wanted

    def forward(self, x: torch.Tensor) -> OrderedDict:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _missing(*_: Any, **__: Any) -> Any:
    raise UsageError("facexlib's detection post-processing needs torchvision; sdtrt runs its own (sdtrt.postprocessing.faces)")


def _facexlib_stand_ins() -> dict[str, types.ModuleType]:
    stand_ins = torchvision_stand_in(normalize=_missing)
    if not stand_ins:
        return {}
    models, utils, ops = (types.ModuleType(f"torchvision.{n}") for n in ("models", "models._utils", "ops"))
    models.resnet50, models._utils, utils.IntermediateLayerGetter, ops.nms = _ResNet50, utils, _LayerOutputs, _missing
    stand_ins["torchvision"].models, stand_ins["torchvision"].ops = models, ops
    return {**stand_ins, "torchvision.models": models, "torchvision.models._utils": utils, "torchvision.ops": ops}


def facexlib_network(kind: str) -> nn.Module:
    """facexlib's RetinaFace (ResNet-50) or ParseNet, built as A1111's face helper builds them (not loaded)."""
    with _LOCK:
        unexecuted_package("facexlib", FACEXLIB)
        with standing_in(_facexlib_stand_ins()):
            if kind == "detector":
                return importlib.import_module("facexlib.detection.retinaface").RetinaFace(
                    network_name="resnet50", half=False, device=torch.device("cpu"))
            return importlib.import_module("facexlib.parsing.parsenet").ParseNet(in_size=512, out_size=512,
                                                                                 parsing_ch=19)


def _restorer_loader() -> Any:
    """spandrel's loader with only the two face restorers A1111 runs (GFPGAN, and CodeFormer from
    spandrel_extra_arches), so that a restorer is never read as an upscaler or the other way round."""
    sp = spandrel()
    if importlib.util.find_spec("spandrel_extra_arches") is None:
        raise UsageError(f"spandrel_extra_arches is not installed: scripts/setup.sh installs it (pip install "
                         f"--no-deps {SPANDREL_EXTRA})")
    codeformer = importlib.import_module("spandrel_extra_arches.architectures.CodeFormer")
    gfpgan = importlib.import_module("spandrel.architectures.GFPGAN")
    registry = sp.ArchRegistry()
    registry.add(sp.ArchSupport.from_architecture(gfpgan.GFPGANArch()),
                 sp.ArchSupport.from_architecture(codeformer.CodeFormerArch()))
    return sp.ModelLoader(registry=registry)


def _kind(state: dict) -> str | None:
    if {"body.conv1.weight", "ClassHead.0.conv1x1.weight", "LandmarkHead.0.conv1x1.weight"} <= state.keys():
        return "detector"
    if {"encoder.0.conv2d.weight", "out_img_conv.conv2d.weight", "out_mask_conv.conv2d.weight"} <= state.keys():
        return "parser"
    return None


def read_face_model(path: Path, allow_pickle: bool = False) -> tuple[str, Any]:
    """("detector" | "parser" | "GFPGAN" | "CodeFormer", the torch module loaded), or UsageError naming the file."""
    state = read_weights(path, allow_pickle, "--face-restorers")
    if not isinstance(state, dict):
        raise UsageError(f"--face-restorers {path}: no state dict in it")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}  # (facexlib strips it too)
    kind = _kind(state)
    if kind is not None:
        module = facexlib_network(kind)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UsageError(f"--face-restorers {path}: a {kind} file whose layout is not facexlib's "
                             f"{'RetinaFace ResNet-50' if kind == 'detector' else 'ParseNet'} ({str(exc)[:200]})") from None
        return kind, module.eval()
    try:
        model = _restorer_loader().load_from_state_dict(state)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--face-restorers {path}: not a face restorer (GFPGAN, CodeFormer), facexlib's face "
                         f"detector (detection_Resnet50_Final) or face parser (parsing_parsenet) "
                         f"({str(exc)[:160]})") from None
    return model.architecture.id, model.model.eval()


class _Detector(nn.Module):
    """RetinaFace on a BGR picture in [0, 255]: the anchors' boxes, face scores and landmarks, not yet decoded."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loc, conf, landmarks = self.net(image - self.mean)
        return loc, conf[:, :, 1], landmarks


class _Parser(nn.Module):
    """ParseNet's labels (the argmax of its 19 classes) of a 512 x 512 face in [-1, 1] RGB."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        return self.net(face)[0].argmax(dim=1).to(torch.int32)


class _GFPGAN(nn.Module):
    """A1111's call (return_rgb=False); the noise is the file's own (the decoder's stored noise buffers) rather
    than drawn at each call, so that the same request gives the same picture."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        return self.net(face, return_rgb=False, randomize_noise=False)[0]


class _BySize(nn.ModuleDict):
    """CodeFormer's fusion layers, looked up by ``str(x.shape[-1])``: under the ONNX tracer that string is
    "tensor(32)" rather than "32"."""

    def __getitem__(self, key: str) -> nn.Module:
        return super().__getitem__(key.removeprefix("tensor(").removesuffix(")"))


class _CodeFormer(nn.Module):
    """A1111's call (adain), its fidelity weight an input: traced with a weight above 0, so the graph always fuses
    the encoder's features, by ``weight`` times their residual (which is the unfused face at weight 0)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net.fuse_convs_dict = _BySize(net.fuse_convs_dict)  # (the same modules and parameter names)
        self.net = net

    def forward(self, face: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.net(face, weight=weight, adain=True)[0]


FACE = TensorSpec("face", "float32", (SINGLE, 3, FACE_SIZE, FACE_SIZE))


def _face(_: dict[str, int]) -> tuple[torch.Tensor, ...]:
    return (torch.rand(1, 3, FACE_SIZE, FACE_SIZE) * 2 - 1,)


def face_descriptor(kind: str, module: nn.Module, slug: str = "") -> Descriptor:
    """The network of one face file: detector, parser, or a restorer (face_restorer_<slug>)."""
    if kind == "detector":
        def picture(d: dict[str, int]) -> tuple[torch.Tensor, ...]:  # (two sizes: the export checks at two batches)
            return (torch.rand(1, 3, d.get(FACE_DETECT_H, 256 + 64 * d.get("batch", 1)), d.get(FACE_DETECT_W, 320)) * 255,)
        rows = (SINGLE, FACE_PRIORS)
        return OnePerCall(FACE_DETECTOR, _Detector(module).eval(), (TensorSpec("image", "float32", (SINGLE, 3, FACE_DETECT_H, FACE_DETECT_W)),),
                          (TensorSpec("boxes", "float32", (*rows, 4)), TensorSpec("scores", "float32", rows),
                           TensorSpec("landmarks", "float32", (*rows, 10))), picture,
                          {FACE_DETECT_H: 288, FACE_DETECT_W: 352})
    if kind == "parser":
        return OnePerCall(FACE_PARSER, _Parser(module).eval(), (FACE,),
                          (TensorSpec("labels", "int32", (SINGLE, FACE_SIZE, FACE_SIZE)),), _face, {})
    restored = (TensorSpec("restored", "float32", (SINGLE, 3, FACE_SIZE, FACE_SIZE)),)
    if kind == "CodeFormer":
        def with_weight(d: dict[str, int]) -> tuple[torch.Tensor, ...]:
            return (*_face(d), torch.rand(1) * 0.8 + 0.1)
        return OnePerCall(face_restorer_component(slug), _CodeFormer(module).eval(),
                          (FACE, TensorSpec("weight", "float32", (SINGLE,))), restored, with_weight, {})
    return OnePerCall(face_restorer_component(slug), _GFPGAN(module).eval(), (FACE,), restored, _face, {})


def register_face_restorers(folder: Path, allow_pickle: bool, report=print) -> tuple[list[Descriptor], dict, dict]:
    """The folder's face models as (the networks to export, the spec's ``face_restorers``: A1111's name -> file,
    sha256, slug; the detector's and parser's files for the spec's extra), every file checked first."""
    files = folder_files(folder, UPSCALER_SUFFIXES, "--face-restorers", "face model", MAX_FACE_FILES)
    found: dict[str, tuple[Path, nn.Module]] = {}
    for path in files:
        kind, module = read_face_model(path, allow_pickle)
        if kind in found:
            raise UsageError(f"--face-restorers {folder}: {found[kind][0].name} and {path.name} are both "
                             f"{kind} files; A1111 runs one of each: keep one")
        found[kind] = (path, module)
        report(f"face model {path.stem}: {kind}")
    restorers = [kind for kind in RESTORERS if kind in found]
    if not restorers:
        raise UsageError(f"--face-restorers {folder}: no GFPGAN or CodeFormer file in it")
    missing = [f"facexlib's face {kind} ({name})" for kind, name in
               (("detector", "detection_Resnet50_Final.pth"), ("parser", "parsing_parsenet.pth")) if kind not in found]
    if missing:
        raise UsageError(f"--face-restorers {folder}: restoring faces also needs {' and '.join(missing)}, the "
                         "files A1111 downloads into models/GFPGAN: copy them into this folder")
    networks = [face_descriptor(kind, found[kind][1], kind.lower()) for kind in ("detector", "parser", *restorers)]
    entry = {kind: {"file": found[kind][0].name, "sha256": file_sha256(found[kind][0], progress=False)}
             for kind in found}
    registry = {kind: {**entry[kind], "slug": kind.lower()} for kind in restorers}
    return networks, registry, {"detector": entry["detector"], "parser": entry["parser"]}
