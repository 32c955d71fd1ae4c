"""A1111's prompt editing and alternation: which text a prompt stands for at each sampling step.

    [from:to:when]   "from" until step ``when``, then "to"      [cat:dog:0.5]  [cat:dog:10]
    [to:when]        nothing until ``when``, then "to"          [dog:0.7]
    [from::when]     "from" until ``when``, then nothing        [cat::0.3]
    [a|b|c]          a different one every step, in turn       [cat|dog]

``when`` with a decimal point is a fraction of the steps, without one an absolute step (A1111 1.6+). In a hires
fix's second pass the numbers go on counting from the first pass: 1.5 is halfway through the second pass, and
an integer counts the first pass's steps too. The forms nest, and they pass through the attention syntax
``(text:1.2)`` / ``[text]`` untouched (sdtrt.prompts weights what comes out).

A prompt reads as A1111 reads it: a bracket that opens no well-formed construct is kept as text, and a prompt
that cannot be read at all (a ``|`` outside brackets, a dangling backslash) is one text for every step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

_AND = re.compile(r"\bAND\b")
_WEIGHTED = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)  # text, with backslash escapes kept as written
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")


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


def _prompt(text: str, i: int) -> tuple[list[Node], int]:
    """Nodes up to the next ``]``, ``)``, ``:`` or ``|`` (or the end); a bracket inside must open a construct."""
    nodes: list[Node] = []
    while i < len(text) and text[i] not in "]):|":
        if text[i] == "[":
            node, i = _square(text, i)
        elif text[i] == "(":
            node, i = _round(text, i)
        else:
            match = _PLAIN.match(text, i)
            if match is None:  # a backslash with nothing after it
                raise _NotAConstruct
            node, i = match.group(), match.end()
        nodes.extend(node) if isinstance(node, list) else nodes.append(node)
    return nodes, i


def _number(nodes: list[Node]) -> str | None:
    """The number a node list is, when it is only text holding one (with spaces around it)."""
    if all(isinstance(n, str) for n in nodes):
        match = _NUMBER.fullmatch("".join(nodes))
        if match is not None:
            return match.group(1)
    return None


def _square(text: str, i: int) -> tuple[Node | list[Node], int]:
    first, i = _prompt(text, i + 1)
    if i >= len(text):
        raise _NotAConstruct
    if text[i] == "]":  # [text]: attention, kept as written
        return ["[", *first, "]"], i + 1
    if text[i] == "|":
        options = [tuple(first)]
        while i < len(text) and text[i] == "|":
            option, i = _prompt(text, i + 1)
            options.append(tuple(option))
        if i < len(text) and text[i] == "]":
            return Alternate(tuple(options)), i + 1
        raise _NotAConstruct
    if text[i] == ":":
        second, i = _prompt(text, i + 1)
        if i < len(text) and text[i] == "]" and (when := _number(second)) is not None:
            return Scheduled((), tuple(first), when), i + 1  # [to:when]
        if i < len(text) and text[i] == ":":
            match = _NUMBER.match(text, i + 1)
            if match is not None and match.end() < len(text) and text[match.end()] == "]":
                return Scheduled(tuple(first), tuple(second), match.group(1)), match.end() + 1
    raise _NotAConstruct


def _round(text: str, i: int) -> tuple[list[Node], int]:
    first, i = _prompt(text, i + 1)
    if i < len(text) and text[i] == ")":
        return ["(", *first, ")"], i + 1
    if i < len(text) and text[i] == ":":
        second, i = _prompt(text, i + 1)
        if i < len(text) and text[i] == ")":
            return ["(", *first, ":", *second, ")"], i + 1
    raise _NotAConstruct


def parse(text: str) -> list[Node] | None:
    """The prompt's nodes; None when A1111 could not read it either (then it is plain text throughout)."""
    nodes: list[Node] = []
    i = 0
    try:
        while i < len(text):
            if text[i] in "[(":
                try:
                    node, i = (_square if text[i] == "[" else _round)(text, i)
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
            node_list, i = _prompt(text, i)
            nodes.extend(node_list)
    except _NotAConstruct:
        return None
    return nodes


def composable_prompts(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable diffusion: the prompt's subprompts, split at ``AND`` (capitals, a word of its own),
    each with its weight (a trailing ``:number``, default 1): ``a cat AND a dog :1.2`` -> [("a cat", 1.0),
    (" a dog", 1.2)]. A prompt without AND is one subprompt of weight 1."""
    parts = []
    for part in _AND.split(prompt):
        match = _WEIGHTED.match(part)
        parts.append((match.group(1), float(match.group(2))) if match.group(2) else (match.group(1), 1.0))
    return parts


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
    ``steps``). ``first_pass_steps``: this is a hires fix's second pass of ``steps`` steps after that many."""
    nodes = parse(text)
    if nodes is None:
        return [(steps, text)]
    boundaries = {steps}

    def collect(items) -> None:
        for node in items:
            if isinstance(node, Scheduled):
                step = _step_of(node.when, steps, first_pass_steps)
                if step >= 1:
                    boundaries.add(step)
                collect(node.before)
                collect(node.after)
            elif isinstance(node, Alternate):
                boundaries.update(range(1, steps + 1))
                for option in node.options:
                    collect(option)

    def render(items, step: int) -> str:
        out = []
        for node in items:
            if isinstance(node, Scheduled):
                out.append(render(node.before if step <= _step_of(node.when, steps, first_pass_steps)
                                  else node.after, step))
            elif isinstance(node, Alternate):
                out.append(render(node.options[(step - 1) % len(node.options)], step))
            else:
                out.append(node)
        return "".join(out)

    collect(nodes)
    return [(step, render(nodes, step)) for step in sorted(boundaries)]


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The text for the 0-based sampling step ``step``, as A1111's sampler picks it: the first entry whose last
    step is not before it."""
    return next((text for last, text in schedule if step <= last), schedule[-1][1])
