"""A1111's prompt styles: named prompt and negative-prompt snippets kept in a ``styles.csv``.

The file's format is A1111's own (a header ``name,prompt,negative_prompt``, one style per row), so a user's
existing styles file works unchanged. A style's text goes where it says ``{prompt}``; without that it is
appended after a comma, as A1111 does.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from sdtrt.contract.errors import InvalidRequest, UsageError

DEFAULT_STYLES_FILE = Path("styles.csv")  # A1111's default name, in the folder the command runs from
# The longest prompt styles may make. A style that says {prompt} twice doubles the prompt, so a request that
# chose it n times would make 2**n copies: the length is worked out before each style is applied.
MAX_STYLED_PROMPT_CHARS = 64 * 1024


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def load_styles(path: Path | None) -> dict[str, PromptStyle]:
    """The styles in ``path`` by name, in file order; none when the file does not exist."""
    if path is None or not path.is_file():
        return {}
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: not a readable styles file ({exc}); A1111's format is a CSV with the header "
                         "name,prompt,negative_prompt") from None
    styles = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name:  # A1111 files may carry blank separator rows
            styles[name] = PromptStyle(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return styles


def merge_prompt(prompt: str, style: str) -> str:
    """``style`` applied to ``prompt``: in place of ``{prompt}`` when it has one, else after a comma."""
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt, style) if part and part.strip())


def merged_length(prompt: str, style: str) -> int:
    """``len(merge_prompt(prompt, style))``, without making it."""
    if "{prompt}" in style:
        uses = style.count("{prompt}")
        return len(style) + uses * (len(prompt) - len("{prompt}"))
    parts = [part for part in (prompt, style) if part and part.strip()]
    return sum(map(len, parts)) + 2 * (len(parts) - 1) if parts else 0


def apply_styles(prompt: str, negative_prompt: str, styles: list[PromptStyle],
                 max_chars: int = MAX_STYLED_PROMPT_CHARS) -> tuple[str, str]:
    """The prompts with ``styles`` applied in order (A1111's order); InvalidRequest naming ``styles`` when a prompt
    would grow past ``max_chars``, checked before each style is applied."""
    for style in styles:
        for text, snippet in ((prompt, style.prompt), (negative_prompt, style.negative_prompt)):
            if (length := merged_length(text, snippet)) > max_chars:
                raise InvalidRequest("styles", [s.name for s in styles],
                                     f"styles whose prompts come to at most {max_chars} characters (with style "
                                     f"{style.name!r:.80} a prompt would have {length})")
        prompt = merge_prompt(prompt, style.prompt)
        negative_prompt = merge_prompt(negative_prompt, style.negative_prompt)
    return prompt, negative_prompt
