"""Interrogators (``sdtrt export --interrogators DIR``, A1111's models/deepbooru): the models A1111's
/sdapi/v1/interrogate and Loopback's "Append interrogated prompt" run on a picture. DeepBooru is A1111's
model-resnet_custom_v3.pt (TorchDeepDanbooru): a bottleneck ResNet whose 179 convolutions (``n_Conv_0`` ...
``n_Conv_178``, sizes read from the file) are wired as A1111's DeepDanbooruModel wires them, and its tags, stored
in the same file. It becomes one network: a 512 x 512 picture in (HWC, in [0, 1]), each tag's probability out;
sdtrt.postprocessing.interrogate turns those into A1111's caption.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import CLIP_INTERROGATOR, SINGLE, TensorSpec, interrogator_component
from sdtrt.export.clip_interrogator import (is_blip, is_clip, read_interrogator_file,
                                           register_clip_interrogator)
from sdtrt.export.networks.checkpoint import file_sha256, folder_files
from sdtrt.export.networks.descriptors import Descriptor, OnePerCall
from sdtrt.postprocessing.interrogate import DEEPBOORU, DEEPBOORU_SIZE

INTERROGATOR_SUFFIXES = (".pt", ".pth", ".safetensors")
CONVS = 179  # A1111's DeepDanbooruModel: n_Conv_0 (the stem) ... n_Conv_178 (the tags' head)
# Its stride-2 convolutions, and each bottleneck block's first convolution -> the one on its shortcut (the other
# blocks add their input as it is); every 3x3 is zero-padded on all sides, or on the right and bottom at stride 2
STRIDED = frozenset({0, 11, 13, 36, 38, 98, 100, 158, 160, 168, 170})
SHORTCUTS = {2: 1, 12: 11, 37: 36, 97: 100, 159: 158, 169: 168}


class DeepDanbooru(nn.Module):
    """A1111's DeepDanbooru network, its widths those of ``state`` (a picture [N, H, W, 3] in [0, 1] -> [N, tags])."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        convs = []
        for i in range(CONVS):
            weight, bias = state[f"n_Conv_{i}.weight"], state.get(f"n_Conv_{i}.bias")
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride=2 if i in STRIDED else 1,
                             bias=bias is not None)
            conv.weight.data.copy_(weight)
            if bias is not None:
                conv.bias.data.copy_(bias)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        plain = [i for i in range(1, CONVS - 1) if i not in SHORTCUTS.values()]
        self.blocks = [tuple(plain[k:k + 3]) for k in range(0, len(plain), 3)]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.convs[0](F.pad(image.permute(0, 3, 1, 2), [2, 3, 2, 3])))
        x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), 3, 2)
        for a, b, c in self.blocks:
            skip = self.convs[SHORTCUTS[a]](x) if a in SHORTCUTS else x
            y = F.relu(self.convs[a](x))
            y = F.relu(self.convs[b](F.pad(y, [0, 1, 0, 1] if b in STRIDED else [1, 1, 1, 1])))
            x = F.relu(self.convs[c](y) + skip)
        return torch.sigmoid(self.convs[CONVS - 1](x).mean(dim=(2, 3)))


def is_deepbooru(state: object) -> bool:
    return isinstance(state, dict) and all(f"n_Conv_{i}.weight" in state for i in range(CONVS))


def read_deepbooru(path: Path, state: dict) -> tuple[DeepDanbooru, list[str]]:
    """The network and tags of a DeepBooru file's contents, or UsageError naming it."""
    tags = state.get("tags")
    head = state[f"n_Conv_{CONVS - 1}.weight"].shape[0]
    if not isinstance(tags, (list, tuple)) or len(tags) != head or not all(isinstance(t, str) for t in tags):
        raise UsageError(f"--interrogators {path}: its tags are not {head} strings (one for each of its outputs)")
    try:
        return DeepDanbooru(state).eval(), list(tags)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--interrogators {path}: its convolutions do not fit DeepBooru's wiring ({exc})") from None


def deepbooru_descriptor(module: nn.Module, tags: int) -> Descriptor:
    def make_inputs(_: dict[str, int]) -> tuple[torch.Tensor, ...]:
        return (torch.rand(1, DEEPBOORU_SIZE, DEEPBOORU_SIZE, 3),)

    return OnePerCall(interrogator_component(DEEPBOORU), module,
                      (TensorSpec("image", "float32", (SINGLE, DEEPBOORU_SIZE, DEEPBOORU_SIZE, 3)),),
                      (TensorSpec("probabilities", "float32", (SINGLE, tags)),), make_inputs, {})


def register_interrogators(folder: Path, allow_pickle: bool, report=print) -> tuple[list[Descriptor], dict]:
    """The folder's interrogators as (their networks, the spec's ``interrogators``: A1111's name -> its entry):
    DeepBooru (the file A1111 reads from models/deepbooru) and the CLIP interrogator (BLIP's and CLIP's files with
    BLIP's vocab.txt and the interrogate/ categories: export/clip_interrogator.py), each file known by its keys."""
    files = folder_files(folder, INTERROGATOR_SUFFIXES, "--interrogators", "interrogator", 4)
    kinds: dict[str, list[tuple[Path, dict]]] = {"DeepBooru": [], "BLIP": [], "CLIP": []}
    for path in files:
        state = read_interrogator_file(path, allow_pickle)
        kind = next((k for k, test in (("DeepBooru", is_deepbooru), ("BLIP", is_blip), ("CLIP", is_clip))
                     if test(state)), None)
        if kind is None:
            raise UsageError(f"--interrogators {path}: neither A1111's DeepBooru (model-resnet_custom_v3.pt), BLIP's "
                             "captioner (model_base_caption_capfilt_large.pth) nor openai's CLIP (ViT-L-14.pt)")
        kinds[kind].append((path, state))
    for kind, found in kinds.items():
        if len(found) > 1:
            raise UsageError(f"--interrogators {folder}: {', '.join(p.name for p, _ in found)} are all {kind}: keep one")
    if bool(kinds["BLIP"]) != bool(kinds["CLIP"]):
        have, lacking = ("BLIP", "CLIP") if kinds["BLIP"] else ("CLIP", "BLIP")
        raise UsageError(f"--interrogators {folder}: A1111's CLIP interrogator needs both BLIP and CLIP; it has "
                         f"{have} ({kinds[have][0][0].name}) but no {lacking} file")
    networks, entries = [], {}
    for path, state in kinds["DeepBooru"]:
        module, tags = read_deepbooru(path, state)
        report(f"interrogator {DEEPBOORU}: {path.name}, {len(tags)} tags")
        entries[DEEPBOORU] = {"file": path.name, "sha256": file_sha256(path, progress=False), "tags": tags}
        networks.append(deepbooru_descriptor(module, len(tags)))
    if kinds["BLIP"]:
        found, entry = register_clip_interrogator(folder, *kinds["BLIP"][0], *kinds["CLIP"][0])
        counts = ", ".join(f"{c['name']} ({len(c['lines'])})" for c in entry["categories"]) or "no categories"
        report(f"interrogator {CLIP_INTERROGATOR}: {entry['file']} and {entry['clip_file']}; {counts}")
        networks += found
        entries[CLIP_INTERROGATOR] = entry
    return networks, entries
