r"""AUTOMATIC1111 "infotext": the generation parameters that A1111 writes into a PNG's ``parameters`` chunk.

Layout (A1111's own): the prompt, then ``Negative prompt: ...`` when there is one, then one line of
``Key: value`` pairs. Values holding a comma, colon or newline are JSON-quoted so the line still parses.

The parameter line is read as A1111 reads it, with its regex ``re_param``::

    \s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)

but not with that regex: ``re.findall`` retries it at every position and each try runs to the end of a run of key
characters, so a line without colons took quadratic time (16 kB: 4 s, 64 kB: over a minute, holding the GIL).
:func:`find_pairs` gives exactly ``findall``'s pairs in one pass, and :func:`check_infotext` bounds what a request
may send (``MAX_INFOTEXT_CHARS``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from sdtrt import __version__
from sdtrt.contract.errors import InvalidRequest

# A1111's own infotexts are a few kB (a prompt is at most a few thousand characters); far more is not an infotext.
MAX_INFOTEXT_CHARS = 64 * 1024

# The pieces of re_param, each a run that matches once: nothing after it can make it backtrack.
_KEY = re.compile(r"\w[\w \-/]+")  # searched for: a word character, then the longest run of key characters
# After the key's colon: a quoted value followed by "," or the end, else up to the next comma (which never fails,
# so the spaces are never given back). Inside quotes there is one way to read each character (an escape, not of
# a newline, or anything but a backslash or quote), so the possessive ++ gives what re_param's backtracking gives.
_VALUE = re.compile(r'\s*(?:("(?:\\.|[^\\"])++")(?:,|$)|([^,]*)(?:,|$))')


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


def check_infotext(text: str, field: str = "infotext") -> str:
    """``text`` when it is short enough to be an infotext; else InvalidRequest naming ``field`` and the limit."""
    if not isinstance(text, str):
        raise InvalidRequest(field, text, "an A1111 infotext (text)")
    if len(text) > MAX_INFOTEXT_CHARS:
        raise InvalidRequest(field, text, f"at most {MAX_INFOTEXT_CHARS} characters (A1111's infotexts are a few kB)")
    return text


def find_pairs(line: str) -> list[tuple[str, str]]:
    """``re.findall(re_param, line)`` (A1111's parameter regex, above) in one pass: the (key, raw value) pairs.

    findall tries the regex at each position from the left. A try skips whitespace, then needs a key: a word
    character and at least one more key character (word characters, space, ``-``, ``/``), the whole run of them
    ending at a ``:`` (a shorter run ends before a key character, never a colon). So a try can only succeed from
    the next word character that has a key character after it (the whitespace before it changes neither the key nor
    the value), and when that run ends elsewhere than at a colon, no try that starts inside it can succeed except
    through the same spaces to the same place: the next try starts where the run ends, and every character is looked
    at a bounded number of times. After the colon the match always succeeds: a quoted value when its closing quote
    is followed by ``,`` or the end, else everything up to the next comma.
    """
    pairs = []
    n = len(line)
    pos = 0
    while pos < n:
        key = _KEY.search(line, pos)
        if key is None:
            break
        end = key.end()
        if end >= n or line[end] != ":":
            pos = end
            continue
        value = _VALUE.match(line, end + 1)
        pairs.append((key.group(), value[1] or value[2]))
        pos = value.end()
    return pairs


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) from an infotext, as A1111's PNG Info reads it. Linear in the text's
    length; a request's infotext is bounded first with :func:`check_infotext`."""
    *head, last = text.strip().split("\n")
    pairs = find_pairs(last)
    if len(pairs) < 3:  # no parameter line: the whole text is the prompt
        head.append(last)
        last = ""
        pairs = []
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {}
    for key, value in pairs:
        params[key.strip()] = _unquote(value.strip())
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


def _unquote(value: str) -> str:
    """A quoted value's text (JSON), as A1111's ``unquote``: one that is not valid JSON is kept as written."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            text = json.loads(value)
        except ValueError:
            return value
        if isinstance(text, str):
            return text
    return value
