"""CLIP's real BPE vocabulary, turned into a tokenizer folder that ``CLIPTokenizer.from_pretrained`` loads.

No wheel ships CLIP's vocab.json/merges.txt, but the open-clip-torch wheel on PyPI carries OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` (MIT). We fetch that wheel from the package registry without its
dependencies (it is never installed), read the file and build the token table the way CLIP's own simple
tokenizer does: 256 byte characters, the same with ``</w>``, the 48,894 merges, then the two specials.
The resulting ids are CLIP's (and so every SD 1.x checkpoint's) real ids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer

from sdtrt.contract.errors import SdtrtError

OPEN_CLIP_REQUIREMENT = "open-clip-torch==3.3.0"
OPEN_CLIP_WHEEL = "open_clip_torch-3.3.0-py3-none-any.whl"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # CLIP's table size minus byte tokens and specials
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def cache_dir() -> Path:
    return Path(os.environ.get("SDTRT_CACHE", Path.home() / ".cache" / "sdtrt"))


def fetch_bpe(source: str | Path | None = None) -> bytes:
    """The gzipped BPE file from ``source`` (a .gz or the wheel), $SDTRT_CLIP_BPE, or the cache that the install
    step filled (:func:`download_bpe`, run by scripts/setup.sh and the docker image). Never downloads."""
    candidates = [Path(p) for p in (source, os.environ.get("SDTRT_CLIP_BPE")) if p]
    candidates.append(cache_dir() / OPEN_CLIP_WHEEL)
    for path in candidates:
        if path.is_file():
            return _checked(_read(path), path)
    raise SdtrtError(
        f"CLIP's BPE vocabulary is not installed (looked for {', '.join(str(p) for p in candidates)}). The install "
        "step fetches it once: run scripts/setup.sh, or `python -m sdtrt.pipeline.clip_vocab` (from the package registry), "
        f"or download {OPEN_CLIP_WHEEL} from PyPI yourself and pass it with --clip-bpe"
    )


def download_bpe() -> Path:
    """Fetch the open-clip-torch wheel (never installed: only its vocabulary file is read) into the cache, from
    the package registry; done once, by the install step."""
    cached = cache_dir() / OPEN_CLIP_WHEEL
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cached.parent),
               OPEN_CLIP_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not cached.is_file():
            raise SdtrtError("could not get CLIP's BPE vocabulary: `" + " ".join(cmd) + "` failed:\n"
                             + result.stderr.strip() + f"\nDownload {OPEN_CLIP_WHEEL} from PyPI yourself into "
                             f"{cached.parent}, or pass it with --clip-bpe")
    _checked(_read(cached), cached)
    return cached


def _read(path: Path) -> bytes:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(BPE_MEMBER)
    return path.read_bytes()


def _checked(data: bytes, path: Path) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise SdtrtError(f"{path} does not hold CLIP's bpe_simple_vocab_16e6.txt.gz (sha256 {digest}, want {BPE_SHA256})")
    return data


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table, in CLIP's order: printable bytes first (mapped to
    themselves), then the others in ascending order, mapped to characters from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def vocab_and_merges(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | Path, bpe_source: str | Path | None = None, pad_token: str = EOS) -> Path:
    """Write vocab.json, merges.txt and the transformers tokenizer files; pads (with ``pad_token``: SD 1.x pads
    with <|endoftext|>, SD 2.x with "!") and truncates to 77 ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(fetch_bpe(bpe_source))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=MAX_LENGTH,
                              pad_token=pad_token)
    tokenizer.save_pretrained(str(out))
    return out


if __name__ == "__main__":  # the install step: python -m sdtrt.pipeline.clip_vocab
    print(f"CLIP vocabulary: {download_bpe()}")
