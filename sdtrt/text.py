"""Prompt text -> CLIP token ids, padded and truncated the way diffusers' pipelines do it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_tokenizer(path: str | Path, max_length: int):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), model_max_length=max_length)


def tokenize(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    """[len(prompts), max_length] int32 ids: BOS, tokens, EOS, then padding (EOS for SD 1.x), truncated."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np").input_ids
    return ids.astype(np.int32)
