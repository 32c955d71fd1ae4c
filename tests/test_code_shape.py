"""The shape of sdtrt's own code (docs/code-layout.md), checked on the source of every installed module: no
function over 80 lines or over 8 parameters, and imports at the top of the module unless a comment says why one
waits for its function (a heavy library a thin layer must not load, an optional one, a command's own)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from test_layers import modules

MAX_LINES = 80
MAX_PARAMETERS = 8  # not counting self or cls


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
    first = (args.posonlyargs + args.args)[:1]
    return count - bool(first and first[0].arg in ("self", "cls"))


def explained(lines: list[str], lineno: int) -> bool:
    """An import whose line holds a comment, or whose block of imports (and blank lines) a comment opens."""
    if "#" in lines[lineno - 1]:
        return True
    for line in reversed(lines[:lineno - 1]):
        stripped = line.strip()
        if stripped.startswith("#"):
            return True
        if not stripped or stripped.startswith(("import ", "from ")) or stripped.endswith(",") or stripped == ")":
            continue  # the rest of the block (a wrapped import's lines included)
        return False
    return False


def shape_problems(source: str, name: str) -> list[str]:
    lines = source.splitlines()
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length > MAX_LINES:
            problems.append(f"{name}:{node.lineno} {node.name} is {length} lines (at most {MAX_LINES})")
        if parameters(node) > MAX_PARAMETERS:
            problems.append(f"{name}:{node.lineno} {node.name} takes {parameters(node)} parameters "
                            f"(at most {MAX_PARAMETERS}: group them in a dataclass)")
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)) and not explained(lines, inner.lineno):
                problems.append(f"{name}:{inner.lineno} an import inside {node.name} with no comment saying why "
                                "it is not at the top")
    return sorted(set(problems))


@pytest.mark.parametrize("module", sorted(modules()))
def test_functions_are_short_narrow_and_import_at_the_top(module):
    path: Path = modules()[module]
    assert shape_problems(path.read_text(), module) == []


def test_the_check_finds_a_long_function_a_wide_one_and_an_unexplained_import():
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    source = (f"def long():\n{long_body}\n\n"
              "def wide(a, b, c, d, e, f, g, h, i):\n    pass\n\n"
              "class A:\n    def method(self, a, b, c, d, e, f, g, h):\n        pass\n\n"
              "def lazy():\n    import json\n    return json\n\n"
              "def lazy_with_reason():\n    # torch is heavy: the client install has none\n    import json\n"
              "    from os import (\n        path,\n    )\n    import sys  # the interpreter's own\n"
              "    return json, path, sys\n")
    problems = shape_problems(source, "m")
    assert [p.split()[1] for p in problems] == ["long", "wide", "an"], problems
    assert "takes 9 parameters" in problems[1] and "inside lazy " in problems[2]
