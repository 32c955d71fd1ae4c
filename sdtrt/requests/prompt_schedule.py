"""A1111's prompt editing and alternation: which text a prompt stands for at each sampling step.

    [from:to:when]   "from" until step ``when``, then "to"      [cat:dog:0.5]  [cat:dog:10]
    [to:when]        nothing until ``when``, then "to"          [dog:0.7]
    [from::when]     "from" until ``when``, then nothing        [cat::0.3]
    [a|b|c]          a different one every step, in turn       [cat|dog]

``when`` with a decimal point is a fraction of the steps, without one an absolute step (A1111 1.6+). In a hires
fix's second pass the numbers go on counting from the first pass: 1.5 is halfway through the second pass, and
an integer counts the first pass's steps too. The forms nest, and they pass through the attention syntax
``(text:1.2)`` / ``[text]`` untouched (sdtrt.requests.prompts weights what comes out).

A prompt reads as A1111 reads it: a bracket that opens no well-formed construct is kept as text, and a prompt
that cannot be read at all (a ``|`` outside brackets, a dangling backslash) is one text for every step, and so
is one whose brackets nest deeper than ``MAX_BRACKET_DEPTH`` (sdtrt.requests.prompts then refuses it by name).

Reading takes time linear in the prompt's length (tests/test_parsing_limits.py): each bracket's construct is
worked out once, and the regexes are single runs that never backtrack far.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

_AND = re.compile(r"\bAND\b")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)  # text, with backslash escapes kept as written
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")
# _NUMBER's number alone, possessive: fullmatch of \d+\.?\d* on a long run of digits that ends in a letter tried
# every split of the run between \d+ and \d* (quadratic); each quantifier here ends where its run of characters
# does, so the strings it takes are the same.
_JUST_NUMBER = re.compile(r"[+-]?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][+-]?+\d++)?+")
# A subprompt's weight, ":number" at its end (composable diffusion): A1111's ^(.*?)(?:\s*:\s*number)?\s*$, read
# from the end (the regex, tried at each position of a long run of spaces, ran to the end of the run each time).
_WEIGHT = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")

# Brackets a prompt may nest: deeper, it is read as plain text here (no schedule), and sdtrt.requests.prompts refuses it
# naming the field; A1111 prompts nest a handful deep. It bounds the parse's recursion and the weighting's work.
MAX_BRACKET_DEPTH = 100


@dataclass(frozen=True)
class Scheduled:
    before: tuple  # nodes shown up to and including step ``when`` (empty: nothing)
    after: tuple
    when: str  # as written: a decimal point makes it a fraction


@dataclass(frozen=True)
class Alternate:
    options: tuple  # node tuples, one per step in turn


Node = Union[str, Scheduled, Alternate]


class _NotAConstruct(Exception):
    pass


class _TooDeep(Exception):
    pass


class _Parser:
    """A1111's grammar by recursive descent. What a bracket at a position reads as depends only on the position,
    so it is worked out once (``_seen``): a bracket that opens no construct makes every enclosing one fail too,
    and reading goes on from the outermost one's next character, which would otherwise read the inner ones
    again (quadratic in the nesting depth, and more). The depth is bounded by MAX_BRACKET_DEPTH."""

    def __init__(self, text: str):
        self.text = text
        self._seen: dict[int, tuple[Node | list[Node], int] | None] = {}  # bracket position -> (node, end) or None

    def construct(self, i: int, depth: int) -> tuple[Node | list[Node], int]:
        """The construct the bracket at ``i`` opens; _NotAConstruct when it opens none."""
        if i not in self._seen:
            if depth > MAX_BRACKET_DEPTH:
                raise _TooDeep
            try:
                self._seen[i] = (self._square if self.text[i] == "[" else self._round)(i, depth)
            except _NotAConstruct:
                self._seen[i] = None
        found = self._seen[i]
        if found is None:
            raise _NotAConstruct
        return found

    def prompt(self, i: int, depth: int) -> tuple[list[Node], int]:
        """Nodes up to the next ``]``, ``)``, ``:`` or ``|`` (or the end); a bracket inside must open a construct."""
        text = self.text
        nodes: list[Node] = []
        while i < len(text) and text[i] not in "]):|":
            if text[i] in "[(":
                node, i = self.construct(i, depth + 1)
            else:
                match = _PLAIN.match(text, i)
                if match is None:  # a backslash with nothing after it
                    raise _NotAConstruct
                node, i = match.group(), match.end()
            nodes.extend(node) if isinstance(node, list) else nodes.append(node)
        return nodes, i

    def _square(self, i: int, depth: int) -> tuple[Node | list[Node], int]:
        text = self.text
        first, i = self.prompt(i + 1, depth)
        if i >= len(text):
            raise _NotAConstruct
        if text[i] == "]":  # [text]: attention, kept as written
            return ["[", *first, "]"], i + 1
        if text[i] == "|":
            options = [tuple(first)]
            while i < len(text) and text[i] == "|":
                option, i = self.prompt(i + 1, depth)
                options.append(tuple(option))
            if i < len(text) and text[i] == "]":
                return Alternate(tuple(options)), i + 1
            raise _NotAConstruct
        if text[i] == ":":
            second, i = self.prompt(i + 1, depth)
            if i < len(text) and text[i] == "]" and (when := _number(second)) is not None:
                return Scheduled((), tuple(first), when), i + 1  # [to:when]
            if i < len(text) and text[i] == ":":
                match = _NUMBER.match(text, i + 1)
                if match is not None and match.end() < len(text) and text[match.end()] == "]":
                    return Scheduled(tuple(first), tuple(second), match.group(1)), match.end() + 1
        raise _NotAConstruct

    def _round(self, i: int, depth: int) -> tuple[list[Node], int]:
        text = self.text
        first, i = self.prompt(i + 1, depth)
        if i < len(text) and text[i] == ")":
            return ["(", *first, ")"], i + 1
        if i < len(text) and text[i] == ":":
            second, i = self.prompt(i + 1, depth)
            if i < len(text) and text[i] == ")":
                return ["(", *first, ":", *second, ")"], i + 1
        raise _NotAConstruct


def _number(nodes: list[Node]) -> str | None:
    """The number a node list is, when it is only text holding one (with spaces around it)."""
    if all(isinstance(n, str) for n in nodes):
        text = "".join(nodes).strip()  # \s and str.isspace are the same characters
        if _JUST_NUMBER.fullmatch(text):
            return text
    return None


def parse(text: str) -> list[Node] | None:
    """The prompt's nodes; None when A1111 could not read it either (then it is plain text throughout), or when
    brackets nest deeper than MAX_BRACKET_DEPTH."""
    parser = _Parser(text)
    nodes: list[Node] = []
    i = 0
    try:
        while i < len(text):
            if text[i] in "[(":
                try:
                    node, i = parser.construct(i, 1)
                    nodes.extend(node) if isinstance(node, list) else nodes.append(node)
                    continue
                except _NotAConstruct:
                    pass
            if text[i] in "[]():":  # a stray bracket or colon is text at the top level
                nodes.append(text[i])
                i += 1
                continue
            if text[i] == "|":
                return None
            node_list, i = parser.prompt(i, 0)
            nodes.extend(node_list)
    except (_NotAConstruct, _TooDeep):
        return None
    return nodes


def composable_prompts(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable diffusion: the prompt's subprompts, split at ``AND`` (capitals, a word of its own),
    each with its weight (a trailing ``:number``, default 1): ``a cat AND a dog :1.2`` -> [("a cat", 1.0),
    (" a dog", 1.2)]. A prompt without AND is one subprompt of weight 1."""
    return [_weighted(part) for part in _AND.split(prompt)]


def _weighted(part: str) -> tuple[str, float]:
    r"""A1111's ``^(.*?)(?:\s*:\s*(number))?\s*$`` (re.S) on a subprompt, from its end: the shortest text that the
    rest can follow, which is everything before the last colon and the spaces before it when a number (alone,
    spaces around it) follows that colon, else the subprompt without its trailing spaces."""
    text = part.rstrip()
    colon = text.rfind(":")
    if colon >= 0:
        number = text[colon + 1:].lstrip()
        if _WEIGHT.fullmatch(number):
            return text[:colon].rstrip(), float(number)
    return text, 1.0


def _step_of(when: str, steps: int, first_pass_steps: int | None) -> int:
    """A1111's reading of ``when``: the step after which the edit applies, in this pass's steps."""
    value = float(when)
    if first_pass_steps is None:
        value = value * steps if "." in when else value
    else:  # a hires pass: the numbers count on from the first pass
        value = (value - 1.0) * steps if "." in when else value - first_pass_steps
    return min(steps, int(value))


def prompt_schedule(text: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text)]: the text the prompt stands for up to each step (1-based, ascending; the last is
    ``steps``). ``first_pass_steps``: this is a hires fix's second pass of ``steps`` steps after that many.

    The text at a step depends only on which side of each edit's step it is and, for each alternation length, on
    the step modulo that length; each such combination is written out once (a prompt of many ``[a|b]`` gives two
    texts, not one per step), and runs of plain text are joined once."""
    nodes = parse(text)
    if nodes is None:
        return [(steps, text)]
    boundaries = {steps}
    edit_steps: dict[int, int] = {}  # id(Scheduled) -> the step after which it shows ``after``
    plain: dict[int, str] = {}  # id(node tuple) -> its text, for the tuples that are only text
    periods: set[int] = set()

    def collect(items) -> None:
        if all(isinstance(node, str) for node in items):
            plain[id(items)] = "".join(items)
            return
        for node in items:
            if isinstance(node, Scheduled):
                step = edit_steps[id(node)] = _step_of(node.when, steps, first_pass_steps)
                if step >= 1:
                    boundaries.add(step)
                collect(node.before)
                collect(node.after)
            elif isinstance(node, Alternate):
                boundaries.update(range(1, steps + 1))
                periods.add(len(node.options))
                for option in node.options:
                    collect(option)

    def render(items, step: int) -> str:
        out = []
        for node in items:
            if isinstance(node, Scheduled):
                chosen = node.before if step <= edit_steps[id(node)] else node.after
            elif isinstance(node, Alternate):
                chosen = node.options[(step - 1) % len(node.options)]
            else:
                out.append(node)
                continue
            known = plain.get(id(chosen))
            out.append(known if known is not None else render(chosen, step))
        return "".join(out)

    collect(nodes)
    sides, lengths = sorted(set(edit_steps.values())), sorted(periods)
    texts: dict[tuple, str] = {}
    schedule = []
    for step in sorted(boundaries):
        key = (tuple(step <= side for side in sides), tuple((step - 1) % length for length in lengths))
        if key not in texts:
            texts[key] = render(nodes, step)
        schedule.append((step, texts[key]))
    return schedule


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The text for the 0-based sampling step ``step``, as A1111's sampler picks it: the first entry whose last
    step is not before it."""
    return next((text for last, text in schedule if step <= last), schedule[-1][1])
