"""The README and docs/*.md, checked against the repository: the README stays short and links every page, every
relative link leads to a file, every `sdtrt SUBCOMMAND --flag` shown is one the real command line takes (read from
its argparse parser, not a list kept here), and every scripts/ or benchmarks/ path (and every other path into the
source tree) exists. Each checker is also run on a made-up text with a wrong flag, link or path, to show it fails."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from sdtrt.client.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SECURITY = ROOT / "SECURITY.md"  # the threat model: linked from the README as the docs pages are
MAX_README_LINES = 300

FENCE = re.compile(r"^[ \t]*(`{3,})[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path into the repository, at the start of a word: scripts/ and benchmarks/ (the brief of this test), and the
# source, test and deployment folders the docs point into.
PATH_ROOTS = ("scripts", "benchmarks", "tests", "docker", "deploy", "sdtrt", "export", "client", "model_repository")
REPO_PATH = re.compile(r"(?<![\w./<>$-])((?:%s)/[\w.-]+(?:/[\w.-]+)*)" % "|".join(PATH_ROOTS))
FLAG = re.compile(r"^\[?(--?[A-Za-z][\w-]*)")
PREFIXES = {"exec", "sudo", "time", "nohup", "env"}
SKIP_FLAGS = {"perf-analyzer"}  # every argument goes to perf_analyzer (add_help=False, nothing declared)


def code_and_prose(text: str) -> tuple[list[str], list[str], str]:
    """(fenced code blocks, inline code spans, the prose with both taken out)."""
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    rest = FENCE.sub("", text)
    spans = [m.group(2) for m in INLINE.finditer(rest)]
    return blocks, spans, INLINE.sub("", rest)


def command_lines(text: str) -> list[str]:
    """Every line of code in the text: fenced lines (backslash continuations joined) and inline spans."""
    blocks, spans, _ = code_and_prose(text)
    lines = []
    for block in blocks:
        lines += block.replace("\\\n", " ").splitlines()
    lines += [" ".join(span.split()) for span in spans]
    return [line for line in lines if re.search(r"(?<![\w.-])sdtrt(?![\w.-])", line)]


def tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote in prose-like code: words, up to a comment
        return re.sub(r"(^|\s)#.*", "", line).split()


def is_punctuation(token: str) -> bool:
    return bool(token) and all(c in "();<>|&" for c in token)


def sdtrt_invocations(line: str) -> list[list[str]]:
    """The arguments of each `sdtrt ...` command on a line: where `sdtrt` starts a command (after env assignments,
    exec/sudo, `(`, `&&`, `|`, `;`), or is the command of a `docker compose ... run SERVICE`."""
    segments, current = [], []
    for token in tokens(line):
        if is_punctuation(token):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for words in segments:
        while words and (re.match(r"^[A-Za-z_]\w*=", words[0]) or words[0] in PREFIXES):
            words = words[1:]
        if not words:
            continue
        if words[0] == "sdtrt" or words[0].endswith("/sdtrt"):
            found.append(words[1:])
        elif words[0] == "docker" and "run" in words and "sdtrt" in words[words.index("run"):]:
            start = words.index("run")
            found.append(words[start + words[start:].index("sdtrt") + 1:])
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def check_commands(text: str, parser: argparse.ArgumentParser) -> tuple[list[str], int]:
    """(problems, how many sdtrt commands were checked) for the code in a markdown text."""
    subs = subcommands(parser)
    problems, checked = [], 0
    for line in command_lines(text):
        for args in sdtrt_invocations(line):
            while args and args[0].startswith("-") and args[0].split("=")[0] in parser._option_string_actions:
                args = args[1:]
            if not args or args[0].startswith("-") and not FLAG.match(args[0]):
                continue
            if args[0].startswith("-"):
                problems.append(f"`{line}`: sdtrt has no option {args[0]}")
                continue
            # `sdtrt txt2img/img2img --url`: each of the alternatives, with the flags that follow
            for name in args[0].split("/") if not args[0].startswith("/") else [args[0]]:
                if name not in subs:
                    problems.append(f"`{line}`: sdtrt has no subcommand {name!r} (it has {', '.join(subs)})")
                    continue
                checked += 1
                if name in SKIP_FLAGS:
                    continue
                options = subs[name]._option_string_actions
                for token in args[1:]:
                    if token == "--":  # the rest goes to tritonserver
                        break
                    flag = FLAG.match(token)
                    if flag and flag.group(1) not in options:
                        problems.append(f"`{line}`: sdtrt {name} has no option {flag.group(1)}")
    return problems, checked


def check_links(text: str, page: Path) -> list[str]:
    """Every relative link (and image) of the page's prose leads to an existing file; anchors are not checked."""
    _, _, prose = code_and_prose(text)
    problems = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        if not (page.parent / path).exists():
            problems.append(f"{page.name}: link to {target}, which does not exist")
    return problems


def linked_files(text: str, page: Path) -> set[Path]:
    _, _, prose = code_and_prose(text)
    return {(page.parent / t.split("#")[0]).resolve() for t in LINK.findall(prose)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")}


def check_paths(text: str, root: Path) -> list[str]:
    problems = []
    for path in sorted(set(REPO_PATH.findall(text))):
        path = path.rstrip(".")
        if not (root / path).exists():
            problems.append(f"{path} does not exist")
    return problems


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def test_the_readme_is_at_most_300_lines():
    count = len(README.read_text().splitlines())
    assert count <= MAX_README_LINES, f"README.md has {count} lines; move sections into docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file(page):
    assert check_links(page.read_text(), page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = linked_files(README.read_text(), README)
    assert DOCS, "no docs/*.md pages"
    assert SECURITY.is_file()
    assert [p.name for p in [*DOCS, SECURITY] if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_sdtrt_command_shown_has_those_subcommands_and_flags(page, parser):
    problems, _ = check_commands(page.read_text(), parser)
    assert problems == []


def test_the_command_check_covers_the_docs(parser):
    """Not vacuous: the pages show many commands, and the check sees those of the README's two code forms."""
    total = sum(check_commands(p.read_text(), parser)[1] for p in PAGES)
    assert total >= 50, total
    assert check_commands("`sdtrt serve -m repos/default`", parser)[1] == 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_scripts_benchmarks_and_source_path_exists(page):
    assert check_paths(page.read_text(), ROOT) == []


def diff_problems(text: str, root: Path) -> list[str]:
    """Lines a ```diff block adds that the file it names (its +++ line) does not hold."""
    problems = []
    for block in re.findall(r"^```diff\n(.*?)^```", text, re.M | re.S):
        target = None
        for line in block.splitlines():
            if line.startswith("+++ b/"):
                target = root / line[len("+++ b/"):]
            elif line.startswith("+") and target is not None:
                held = target.read_text().splitlines() if target.is_file() else []
                if line[1:] not in held:
                    problems.append(f"{target.relative_to(root)}: {line[1:].strip()[:80]}")
    return problems


def test_the_readmes_example_diff_is_in_the_code():
    assert "```diff" in README.read_text()
    assert diff_problems(README.read_text(), ROOT) == []


def test_the_checks_fail_on_a_wrong_flag_subcommand_link_or_path(parser, tmp_path):
    text = "\n".join([
        "Run `sdtrt serve --no-such-flag` or:",
        "",
        "```bash",
        "sdtrt txt2img \"a fox\" --seed 1 \\",
        "    --made-up 3        # --in-a-comment is not checked",
        "sdtrt frobnicate --x",
        "SDTRT_X=1 sdtrt serve -m repos/x -- --log-verbose=1     # after --: tritonserver's",
        "sdtrt perf-analyzer -m txt2img --anything-goes",
        "kubectl -n sdtrt create secret generic x      # a namespace, not the command",
        "docker compose run --rm export sdtrt init-default --out /m --nope",
        "```",
        "",
        "[a page](missing.md), [the readme](../README.md) and `benchmarks/no_such_bench.py` and scripts/nope.sh.",
        "Alternatives: `sdtrt txt2img/img2img --url` is two commands, `sdtrt txt2img/nope --seed` one and a wrong one.",
    ])
    problems, checked = check_commands(text, parser)
    assert checked == 8, problems
    assert len(problems) == 5, problems
    assert any("serve has no option --no-such-flag" in p for p in problems)
    assert any("txt2img has no option --made-up" in p for p in problems)
    assert any("no subcommand 'frobnicate'" in p for p in problems)
    assert any("init-default has no option --nope" in p for p in problems)
    assert any("no subcommand 'nope'" in p for p in problems)
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    (tmp_path / "README.md").write_text("")
    assert check_links(text, page) == ["page.md: link to missing.md, which does not exist"]
    assert check_paths(text, ROOT) == ["benchmarks/no_such_bench.py does not exist", "scripts/nope.sh does not exist"]
    wrong = "```diff\n+++ b/sdtrt/contract/spec.py\n+SPEC_VERSION = -1  # never\n```\n"
    assert diff_problems(wrong, ROOT) == ["sdtrt/contract/spec.py: SPEC_VERSION = -1  # never"]


def reliability_table_tests(text: str) -> list[str]:
    """The tests named (backticked ``test_...``) in the rows of docs/serving.md's reliability table."""
    section = text.split("## Reliability: faults and what they do", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [name for row in rows for name in re.findall(r"`(test_[^`]*)`", row)]


def missing_tests(names: list[str], tests: Path) -> list[str]:
    defined = {m.group(1) for path in tests.glob("test_*.py")
               for m in re.finditer(r"^def (test_\w+)\(", path.read_text(), re.M)}
    return [name for name in names if name not in defined]


def test_every_test_the_reliability_table_names_exists():
    """Each guarantee in the table is held by the test it names: a renamed or removed test (or a name cut short)
    would leave a guarantee that nothing checks."""
    names = reliability_table_tests((ROOT / "docs" / "serving.md").read_text())
    assert len(names) >= 20, names  # the table was found, with its rows
    assert missing_tests(names, ROOT / "tests") == []
    made_up = "## Reliability: faults and what they do\n\n| a | b | `test_no_such_test`, `test_a_write_past_...` |\n"
    assert missing_tests(reliability_table_tests(made_up), ROOT / "tests") == ["test_no_such_test", "test_a_write_past_..."]
