"""LoRAs and embeddings registered at export, served per request (the serving side: ``sdtrt.requests.extra_networks``).

A LoRA slot is a layer of a network that a LoRA may change: every Linear (and 1x1 convolution) of the U-Net's
transformer blocks and of the text encoder's layers -- what kohya/A1111 LoRAs train. The ``*_lora`` variant of a
network adds, at each slot, ``x -> base(x) + up_i(down_i(x))`` with that slot's part of two inputs that carry every
slot's matrices end to end (``lora_down`` [rows, R, D_in], ``lora_up`` [rows, R, D_out]).

A LoRA file is read by diffusers (``load_lora_weights``: kohya/A1111 and diffusers formats), its per-layer matrices
taken from the PEFT layers diffusers made, packed in that same slot order, and the adapter unloaded again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtrt.contract.errors import UsageError
from sdtrt.export.networks.checkpoint import file_sha256, lora_tensors, torch_load
from sdtrt.requests.extra_networks import LORA_NETWORKS

LORA_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin")  # read by sdtrt.export.networks.checkpoint.torch_load: weights only unless trusted


@dataclass(frozen=True)
class Slot:
    name: str  # module path in the network
    in_features: int
    out_features: int
    conv: bool  # a 1x1 convolution (SD 1.x's proj_in/proj_out): channels first


def lora_slots(network: torch.nn.Module, kind: str) -> list[Slot]:
    """The layers of ``network`` (a U-Net or a CLIP text model) that get a LoRA slot, in a fixed order."""
    slots = []
    for name, module in network.named_modules():
        if kind == "unet":
            if ".attentions." not in f".{name}" or ".resnets." in name:  # the transformer blocks only
                continue
        elif ".layers." not in name:  # the text encoder's transformer layers
            continue
        if isinstance(module, torch.nn.Linear):
            slots.append(Slot(name, module.in_features, module.out_features, False))
        elif isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1):
            slots.append(Slot(name, module.in_channels, module.out_channels, True))
    return slots


def slot_width(slots: list[Slot]) -> tuple[int, int]:
    """(D_in, D_out): the widths of the packed ``lora_down`` / ``lora_up`` inputs."""
    return sum(s.in_features for s in slots), sum(s.out_features for s in slots)


class _Matrices:
    down: torch.Tensor
    up: torch.Tensor


class _SlotLayer(torch.nn.Module):
    """``base(x)`` plus this slot's low-rank delta, read from the request's packed matrices, row by row."""

    def __init__(self, base: torch.nn.Module, slot: Slot, start_in: int, start_out: int, matrices: _Matrices):
        super().__init__()
        self.base, self.slot, self.matrices = base, slot, matrices
        self.start_in, self.start_out = start_in, start_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        s = self.slot
        down = self.matrices.down[:, :, self.start_in:self.start_in + s.in_features]  # [N, R, in]
        up = self.matrices.up[:, :, self.start_out:self.start_out + s.out_features]  # [N, R, out]
        if s.conv:  # [N, C, H, W]: channels first
            delta = torch.bmm(up.transpose(1, 2), torch.bmm(down, x.flatten(2)))  # [N, out, HW]
        else:  # [N, ..., C]
            delta = torch.bmm(torch.bmm(x.reshape(x.shape[0], -1, s.in_features), down.transpose(1, 2)), up)
        return y + delta.reshape(y.shape)


class WithLoraSlots(torch.nn.Module):
    """A network wrapper (a descriptor's module) with two more inputs: the packed LoRA matrices. The slot layers are
    put in place for the call only, so the plain network (and its export) is left as it was."""

    def __init__(self, inner: torch.nn.Module, network: torch.nn.Module, slots: list[Slot]):
        super().__init__()
        self.inner, self.network, self.slots = inner, network, slots

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *plain, down, up = inputs
        matrices = _Matrices()
        matrices.down, matrices.up = down, up
        originals = []
        start_in = start_out = 0
        try:
            for slot in self.slots:
                parent_name, _, child = slot.name.rpartition(".")
                parent = self.network.get_submodule(parent_name)
                base = getattr(parent, child)
                originals.append((parent, child, base))
                setattr(parent, child, _SlotLayer(base, slot, start_in, start_out, matrices))
                start_in += slot.in_features
                start_out += slot.out_features
            return self.inner(*plain)
        finally:
            for parent, child, base in reversed(originals):
                setattr(parent, child, base)


# --- registration ---------------------------------------------------------------------------------------------

def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash for a .safetensors file: sha256 of the tensors, skipping the JSON header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, allow_pickle: bool, what: str) -> list[Path]:
    """The folder's LoRA / embedding files. A pickled one (.pt, .ckpt, .bin) that needs more than a weights-only
    load is refused here, before any file is registered, unless ``allow_pickle``."""
    if not folder.is_dir():
        raise UsageError(f"--{what} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix in LORA_SUFFIXES + PICKLE_SUFFIXES)
    if not files:
        raise UsageError(f"--{what} {folder}: no .safetensors files in it")
    if not allow_pickle:
        for path in files:
            if path.suffix in PICKLE_SUFFIXES:
                torch_load(path, False, f"--{what}")
    return files


def _load_pickled(path: Path, allow_pickle: bool, what: str):
    return torch_load(path, allow_pickle, what)[0]


def _lora_layers(network: torch.nn.Module, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (down [r, in], up [r, out] with alpha/rank in it), from the PEFT layers diffusers made."""
    # peft (slow to import) only when LoRA slots are made
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in network.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter):
            raise ValueError(f"{name} is a DoRA layer; only plain LoRA layers are served")
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if a.dim() == 4 and a.shape[2:] != (1, 1):
            raise ValueError(f"{name} has a {tuple(a.shape[2:])} convolution LoRA (LoCon); only linear and 1x1 "
                             "layers are served")
        down = a.reshape(a.shape[0], -1).detach().float()
        up = (b.reshape(b.shape[0], -1) * module.scaling[adapter]).t().detach().float()
        layers[name.replace(".base_layer", "")] = (down, up)
    return layers


def _pack(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], slots: list[Slot], network: str,
          lora: str) -> dict[str, torch.Tensor] | None:
    if not layers:
        return None
    names = {s.name for s in slots}
    outside = sorted(set(layers) - names)
    if outside:
        raise UsageError(f"LoRA {lora!r} changes {network} layers that have no LoRA slot ({', '.join(outside[:3])}"
                         f"{' ...' if len(outside) > 3 else ''}); served LoRAs reach the attention and feed-forward "
                         "layers only")
    rank = max(down.shape[0] for down, _ in layers.values())
    d_in, d_out = slot_width(slots)
    down, up = torch.zeros(rank, d_in), torch.zeros(rank, d_out)
    start_in = start_out = 0
    for slot in slots:
        if slot.name in layers:
            a, b = layers[slot.name]
            down[:a.shape[0], start_in:start_in + slot.in_features] = a
            up[:b.shape[0], start_out:start_out + slot.out_features] = b
        start_in += slot.in_features
        start_out += slot.out_features
    return {f"{network}.down": down.contiguous(), f"{network}.up": up.contiguous()}


def _file_layers(path: Path) -> int:
    """How many layers a LoRA file has (its down matrices), to tell whether all of them reached the model."""
    if path.suffix != ".safetensors":
        return 0

    with safe_open(str(path), framework="pt") as f:
        return sum(1 for key in f.keys() if key.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight")))


def register_loras(pipe, folder: Path, slots: dict[str, list[Slot]], out: Path, allow_pickle: bool,
                   report=print) -> dict[str, dict]:
    """Pack every LoRA file of ``folder`` for ``pipe``'s slots into ``out`` (one .safetensors each); the registry
    entries the spec keeps (name -> file, rank per network, hashes)."""
    files = _files(folder, allow_pickle, "loras")  # refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    registry = {}
    for path in files:
        name = path.stem
        adapter = "sdtrt_register"
        try:
            weights = lora_tensors(path, allow_pickle, "--loras") if path.suffix in PICKLE_SUFFIXES else str(path)
            pipe.load_lora_weights(weights, adapter_name=adapter)
            per_network = {net: _lora_layers(getattr(pipe, net), adapter) for net in LORA_NETWORKS}
        except UsageError:
            raise
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]
            raise UsageError(f"LoRA {path.name} does not fit this model ({detail}): a LoRA for another "
                             "architecture?") from None
        finally:
            pipe.unload_lora_weights()
        reached = sum(len(layers) for layers in per_network.values())
        expected = _file_layers(path)
        if reached == 0 or reached < expected:
            raise UsageError(f"LoRA {path.name}: {reached} of its {expected or '?'} layers fit this model's layers; "
                             "a LoRA for another architecture?")
        tensors, rank = {}, {}
        for net, layers in per_network.items():
            packed = _pack(layers, slots[net], net, name)
            if packed is not None:
                tensors.update(packed)
                rank[net] = int(packed[f"{net}.down"].shape[0])
        file = out / f"{name}.safetensors"
        save_file(tensors, str(file))
        sha = file_sha256(path, progress=False)
        registry[name] = {"file": str(file), "rank": rank, "sha256": sha,
                          "hash": addnet_hash(path) if path.suffix == ".safetensors" else sha,
                          "source": path.name}
        report(f"LoRA {name}: rank {max(rank.values())} on {', '.join(rank)}")
    return registry


def read_embedding(path: Path, allow_pickle: bool = False) -> torch.Tensor:
    """[n, H] vectors of an A1111/diffusers textual-inversion file (``emb_params``, ``string_to_param``, or one
    tensor under the token's name). A pickled one (.pt, .bin) is read weights-only unless ``allow_pickle``."""
    if path.suffix == ".safetensors":
        data = load_file(str(path))
    else:
        data = _load_pickled(path, allow_pickle, "--embeddings")
    if not isinstance(data, dict):
        raise UsageError(f"embedding {path.name}: expected a dict of tensors, found {type(data).__name__}")
    if "string_to_param" in data:
        data = data["string_to_param"]
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if "emb_params" in data:
        tensors = [data["emb_params"]]
    if len(tensors) != 1:
        raise UsageError(f"embedding {path.name}: expected one tensor of vectors, found keys {sorted(data)[:5]} "
                         "(an SDXL embedding has clip_l and clip_g: that is for an SDXL model)")
    vectors = tensors[0].detach().float()
    return vectors.reshape(-1, vectors.shape[-1])


def register_embeddings(folder: Path, hidden: int, out: Path, allow_pickle: bool, report=print) -> dict[str, dict]:
    files = _files(folder, allow_pickle, "embeddings")  # refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    registry = {}
    for path in files:
        vectors = read_embedding(path, allow_pickle)
        if vectors.shape[1] != hidden:
            raise UsageError(f"embedding {path.name} has {vectors.shape[1]}-wide vectors; this model's text encoder "
                             f"takes {hidden} (an embedding for another architecture)")
        file = out / f"{path.stem}.safetensors"
        save_file({"vectors": vectors.contiguous()}, str(file))
        registry[path.stem] = {"file": str(file), "vectors": int(vectors.shape[0]),
                               "sha256": file_sha256(path, progress=False), "source": path.name}
        report(f"embedding {path.stem}: {vectors.shape[0]} vector(s)")
    return registry
