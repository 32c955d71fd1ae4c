"""AUTOMATIC1111 "infotext": the generation parameters that A1111 writes into a PNG's ``parameters`` chunk.

Layout (A1111's own): the prompt, then ``Negative prompt: ...`` when there is one, then one line of
``Key: value`` pairs. Values holding a comma, colon or newline are JSON-quoted so the line still parses.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sdtrt import __version__

_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: Any) -> str:
    text = _fmt(value)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """``params`` in A1111's order (Steps, Sampler, CFG scale, Seed, Size, Model hash, Model, ...); None is left out."""
    params = {**params, "Version": f"sdtrt {__version__}"}
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) from an infotext, as A1111's PNG Info reads it."""
    *head, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # no parameter line: the whole text is the prompt
        head.append(last)
        last = ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        params[key.strip()] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), params
