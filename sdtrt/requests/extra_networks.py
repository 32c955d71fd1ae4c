"""A1111's extra networks in prompts, served per request: ``<lora:name:weight>`` tags and embeddings by name.

LoRAs. ``sdtrt export --loras DIR`` registers each LoRA file as two packed matrices per network it changes
(``sdtrt.export.networks.lora``): ``down`` [r, D_in] and ``up`` [r, D_out], where D_in / D_out are the inputs / outputs of
every layer the export gave a LoRA slot, laid end to end, and ``up`` already carries the file's alpha / rank.
A request's LoRAs are those matrices stacked along the rank (the sum of low-rank deltas is one delta of the summed
rank), each ``up`` times the tag's weight, padded to a multiple of ``RANK_STEP`` so that requests with different
LoRAs still share the U-Net's batches. The networks' ``*_lora`` variants take them as two more inputs, one copy per
row: nothing is patched into weights, so concurrent requests never see each other's LoRAs and none leaves residue.

Embeddings. A registered embedding is used by writing its name, as in A1111: the prompt's tokens are matched
against each name's tokens; a match becomes that embedding's vectors, marked in the token ids with
``EMBEDDING_MARK`` and carried beside them (``EMBEDDING_VECTORS``); the text encoder takes the vector wherever the mark
is (``sdtrt.export.networks.descriptors.TextEncoder``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtrt.contract.errors import InvalidRequest

LORA_NETWORKS = ("text_encoder", "unet")  # the networks a LoRA reaches; each has a "<name>_lora" variant
LORA_SUFFIX = "_lora"
LORA_DOWN, LORA_UP = "lora_down", "lora_up"  # the variants' extra inputs: [rows, rank, D_in], [rows, rank, D_out]
EMBEDDING_VECTORS = "embedding_vectors"  # the text encoder's input: [rows, 77, H], read where the id is the mark
EMBEDDING_MARK = -1  # the token id of a position whose embedding comes from EMBEDDING_VECTORS (no token has it)
RANK_STEP = 8  # request ranks are padded to a multiple of this: fewer shapes, more shared batches

# A1111's extra-network syntax is the regex <(\w+):([^>]+)>. Searched for as one regex, a "<name:" with no ">"
# after it ran to the end of the text once per "<" (quadratic), so the tags are found by extra_network_tags.
_TAG_START = re.compile(r"<(\w+):")
LORA_TAGS = ("lora", "lyco")  # A1111 reads <lyco:...> as a LoRA too


@dataclass(frozen=True)
class ExtraNetworkTag:
    start: int
    end: int
    kind: str  # what comes before the first colon: "lora", "hypernet", ...
    body: str  # what comes after it, up to the ">"
    text: str  # the tag as written


def extra_network_tags(text: str) -> list[ExtraNetworkTag]:
    r"""The matches of ``re.finditer(r"<(\w+):([^>]+)>", text)``, in one pass: a tag is "<", a word, ":", then at
    least one character up to the first ">" after it. When no ">" follows, no later tag can close either."""
    tags = []
    pos = 0
    while True:
        start = _TAG_START.search(text, pos)
        if start is None:
            break
        close = text.find(">", start.end())
        if close < 0:
            break
        if close == start.end():  # "<name:>": nothing between the colon and ">"; a tag may start later
            pos = start.start() + 1
            continue
        tags.append(ExtraNetworkTag(start.start(), close + 1, start.group(1), text[start.end():close],
                                    text[start.start():close + 1]))
        pos = close + 1
    return tags


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float  # weight on the text encoder's delta
    unet: float  # weight on the U-Net's delta
    text: str  # the tag as written, for error messages


def strip_extra_networks(text: str) -> str:
    """The prompt the tokenizer sees: A1111 removes every ``<kind:...>`` tag before tokenizing."""
    out, pos = [], 0
    for tag in extra_network_tags(text):
        out.append(text[pos:tag.start])
        pos = tag.end
    out.append(text[pos:])
    return "".join(out)


def parse_lora_tags(text: str, field: str) -> list[LoraTag]:
    """``<lora:name>``, ``<lora:name:w>``, ``<lora:name:te:unet>``, ``<lora:name:te=a:unet=b>`` (A1111's forms)."""
    tags = []
    for match in extra_network_tags(text):
        kind, body = match.kind, match.body
        if kind not in LORA_TAGS:
            raise InvalidRequest(field, match.text, "extra networks of kind <lora:name:weight>; "
                                 f"<{kind}:...> is not served")
        positional, named = [], {}
        for item in body.split(":"):
            key, eq, value = item.partition("=")
            if eq:
                named[key.strip()] = value.strip()
            else:
                positional.append(item.strip())
        try:
            if not positional or not positional[0] or set(named) - {"te", "unet", "dyn"} or len(positional) > 4:
                raise ValueError
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            raise InvalidRequest(field, match.text, "<lora:NAME:WEIGHT> (or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>), "
                                 "weights as numbers") from None
        if "dyn" in named or len(positional) > 3:
            raise InvalidRequest(field, match.text, "no dyn= rank cut: the registered LoRA is served whole")
        tags.append(LoraTag(positional[0], te, unet, match.text))
    return tags


def request_loras(prompt: str, negative_prompt: str, loras: dict[str, dict], max_rank: int) -> list[LoraTag]:
    """The LoRAs a request uses (its prompt's tags, then its negative prompt's, as A1111 activates both), each one
    checked against the model's registered LoRAs, and their total rank against what the export allows."""
    tags = []
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        for tag in parse_lora_tags(text, field):
            if tag.name not in loras:
                known = ", ".join(sorted(loras)) if loras else "none (export the model with --loras DIR)"
                raise InvalidRequest(field, tag.text, f"a LoRA registered for this model: {known}")
            tags.append(tag)
    rank = sum(lora_rank(loras[tag.name]) for tag in tags)
    if rank > max_rank:
        raise InvalidRequest("prompt", ", ".join(tag.text for tag in tags),
                             f"LoRAs of at most {max_rank} summed rank (these sum to {rank}); re-export with a larger "
                             "--max-lora-rank")
    return tags


def lora_rank(entry: dict) -> int:
    return max(entry["rank"].values(), default=0)


def padded_rank(rank: int) -> int:
    return -(-rank // RANK_STEP) * RANK_STEP


class LoraLibrary:
    """A model's registered LoRAs, read from the repository once each, and the matrices a request sends."""

    def __init__(self, repo: Path, loras: dict[str, dict]):
        self.repo = Path(repo)
        self.loras = loras
        self._packed: dict[str, dict[str, np.ndarray]] = {}

    def packed(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._packed:
            # safetensors only where a LoRA is read: requests load in a client-only install, which has none
            from safetensors.numpy import load_file

            self._packed[name] = load_file(str(self.repo / self.loras[name]["file"]))
        return self._packed[name]

    def matrices(self, tags: list[LoraTag], network: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(down [R, D_in], up [R, D_out]) of ``network`` for these tags, R padded to RANK_STEP; None if no tag
        changes it (the request then runs the network without its LoRA inputs)."""
        downs, ups = [], []
        for tag in tags:
            weight = tag.te if network == "text_encoder" else tag.unet
            packed = self.packed(tag.name)
            if weight == 0 or f"{network}.down" not in packed:
                continue
            downs.append(packed[f"{network}.down"])
            ups.append(packed[f"{network}.up"] * np.float32(weight))
        if not downs:
            return None
        down, up = np.concatenate(downs), np.concatenate(ups)
        pad = padded_rank(len(down)) - len(down)
        return (np.pad(down, ((0, pad), (0, 0))), np.pad(up, ((0, pad), (0, 0))))


class RequestLoras:
    """One request's LoRA inputs for each network, made once and reused at every step (the copies per row are
    what every U-Net call sends, so they are kept, per row count and device)."""

    def __init__(self, library: LoraLibrary | None, tags: list[LoraTag]):
        self.tags = tags
        self.matrices = {net: library.matrices(tags, net) if library and tags else None for net in LORA_NETWORKS}
        self._inputs: dict[tuple, tuple] = {}

    def inputs(self, network: str, rows: int, device) -> tuple | None:
        """(lora_down, lora_up) torch tensors [rows, R, D] on ``device`` for ``network``; None: run it plain."""
        # torch only where LoRAs are packed for a network: requests load in a client-only install, which has none
        import torch

        if self.matrices.get(network) is None:
            return None
        key = (network, rows, str(device))
        if key not in self._inputs:
            self._inputs[key] = tuple(torch.from_numpy(m).to(device).unsqueeze(0).expand(rows, *m.shape).contiguous()
                                      for m in self.matrices[network])
        return self._inputs[key]


def no_loras() -> RequestLoras:
    return RequestLoras(None, [])


class EmbeddingTable:
    """A model's registered embeddings: their vectors, and each name's tokens to find it in a prompt by."""

    def __init__(self, repo: Path, embeddings: dict[str, dict], tokenizer, hidden: int):
        # safetensors only where an embedding is read: requests load in a client-only install, which has none
        from safetensors.numpy import load_file

        self.hidden = hidden
        self.vectors = {name: load_file(str(Path(repo) / entry["file"]))["vectors"].astype(np.float32)
                        for name, entry in embeddings.items()}
        # First token -> (tokens, name), longest first: A1111 takes the longest name that matches at a position.
        self.by_first: dict[int, list[tuple[list[int], str]]] = {}
        for name in embeddings:
            ids = tokenizer(name, add_special_tokens=False).input_ids
            self.by_first.setdefault(ids[0], []).append((ids, name))
        for candidates in self.by_first.values():
            candidates.sort(key=lambda c: -len(c[0]))

    def at(self, tokens: list[int], position: int) -> tuple[str, int] | None:
        """(name, tokens its name spans) of the embedding written at ``position``, if one is."""
        for ids, name in self.by_first.get(tokens[position], ()):
            if tokens[position:position + len(ids)] == ids:
                return name, len(ids)
        return None


def used_embeddings(text: str, names) -> list[str]:
    """Which embeddings a prompt writes, for the infotext's "TI hashes" (a whole-word, case-insensitive match:
    what the tokenizer's match amounts to, without a tokenizer on the client)."""
    found = []
    for name in names:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", text, re.I):
            found.append(name)
    return found
