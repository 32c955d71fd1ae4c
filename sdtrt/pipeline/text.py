"""The CLIP tokenizer of an export (A1111 prompt parsing and chunking: sdtrt/requests/prompts.py)."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer


def load_tokenizer(path: str | Path, max_length: int):
    return CLIPTokenizer.from_pretrained(str(path), model_max_length=max_length)
