"""Write the request-field table of docs/serving.md from sdtrt's one field registry (sdtrt/requests/fields.py).

    .venv/bin/python scripts/field_table.py          # rewrite the table
    .venv/bin/python scripts/field_table.py --check  # exit 1 if it is out of date (tests/test_fields.py runs it)
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdtrt.requests.fields import FIELDS, RequestField

DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
START, END = "<!-- fields:start -->", "<!-- fields:end -->"
WIRE = {"string": "BYTES", "int64": "INT64", "int32": "INT32", "float32": "FP32", "bool": "BOOL"}


def _value(v: object) -> str:
    return "the model's" if callable(v) else "" if v is None else f"{v!r}" if isinstance(v, str) else f"{v}"


def _row(f: RequestField) -> str:
    if callable(f.choices):
        allowed = "the model's names"
    elif f.choices:
        allowed = ", ".join(f.choices) if len(f.choices) <= 6 else f"{len(f.choices)} names (`sdtrt samplers`)"
    else:
        bounds = [b for b in (_value(f.minimum), _value(f.maximum)) if b]
        allowed = " to ".join(bounds) if len(bounds) == 2 else ""
        if f.multiple_of:
            allowed += f", a multiple of {_value(f.multiple_of)}"
        if f.max_length:
            allowed = f"at most {_value(f.max_length)} characters"
    cells = [f"`{f.name}`", WIRE[f.dtype], ", ".join(f.jobs), _value(f.default), allowed, f.help.replace("|", "\\|"),
             f"`{f.a1111}`" if f.a1111 else "", f.infotext or "", f.label or "", f"`{f.cli_flag}`"]
    return "| " + " | ".join(cells) + " |"


def table() -> str:
    header = ("| field | wire dtype | jobs | default | allowed | what | A1111 JSON | infotext | page | CLI |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([header, *map(_row, FIELDS)])


def rendered(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = rendered(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is out of date: run scripts/field_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
