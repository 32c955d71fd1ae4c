"""Every parser that reads user text does work linear in its length, and gives what it gave before.

The reference for each is the code it replaced (A1111's own regexes, kept here only as references): the same
results on thousands of short strings built from the characters each one treats specially, and on real A1111
infotexts; then, on inputs built to make the old code quadratic (or recursive), the work grows linearly: a
quarter of the input takes a quarter of the time, measured side by side (the old code took minutes on most of
these inputs, so no ratio here passes by luck, and none depends on how fast the machine is).
"""

from __future__ import annotations

import json
import random
import re
import signal
import time

import pytest

from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.extra_networks import parse_lora_tags, strip_extra_networks
from sdtrt.requests.generation import settings_from_infotext
from sdtrt.requests.infotext import build_infotext, parse_infotext
from sdtrt.requests.prompt_schedule import composable_prompts, prompt_schedule
from sdtrt.requests.prompts import parse_prompt_attention

KB64 = 64 * 1024
MB = 10**6

# A1111's regexes as they were (modules/infotext_utils.py's re_param, prompt_parser's re_break, ...): references.
OLD_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
OLD_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
OLD_WEIGHTED = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)
OLD_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")
OLD_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def random_strings(alphabet, count: int, longest: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def seconds(function, *args, abort_after: float = 30.0) -> float:
    """How long ``function(*args)`` takes; a run past ``abort_after`` is stopped (the old code would run for
    minutes), so that a regression fails instead of hanging the suite."""
    def give_up(*_):
        raise TimeoutError(f"still running after {abort_after} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, abort_after)
    try:
        start = time.perf_counter()
        function(*args)
        return time.perf_counter() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_linear(function, build, size: int, *args, name: str = "") -> None:
    """``function`` on ``build(size)`` takes at most 8 times what it takes on ``build(size // 4)``: linear work
    takes 4 times, quadratic 16. A ratio measured in one run holds on a slow or busy machine, where a bound in
    seconds does not (CI measured 1.3 s against a 1 s bound). Best of three, so that one preemption does not
    decide; the 10 ms slack covers timer noise on inputs that take a few milliseconds."""
    quarter, full = build(size // 4), build(size)
    small = min(seconds(function, quarter, *args) for _ in range(3))
    large = min(seconds(function, full, *args) for _ in range(3))
    assert large < 8 * small + 0.01, (
        f"{name}: {large:.3f} s on {len(full)} characters, {small:.3f} s on {len(quarter)}: not linear")


# --- infotext ---------------------------------------------------------------------------------------------------

def old_parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """sdtrt's parse before the scanner, with A1111's unquote (a quoted value that is not JSON stays as written)."""
    *head, last = text.strip().split("\n")
    if len(OLD_PAIR.findall(last)) < 3:
        head.append(last)
        last = ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params = {}
    for key, value in OLD_PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        params[key.strip()] = value
    return "\n".join(prompt_lines), "\n".join(negative_lines), params


INFOTEXT_CHARACTERS = list("abZ_9 ,:\"\\-/\n(\té")

A1111_INFOTEXTS = [
    # tests/test_web.py, tests/test_page.py, tests/test_a1111_seeds.py
    "a cat\nNegative prompt: dogs\nSteps: 3, Sampler: Euler, Seed: 11, Size: 64x64, Resize mode: Crop and resize",
    "a castle on a hill\nNegative prompt: fog\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, "
    "Seed: 1234, Size: 128x96, Clip skip: 2, Variation seed: 99, Variation seed strength: 0.25",
    "a\nSteps: 4, Seed: 1, RNG: NV",
    # A1111's own docstring example (modules/infotext_utils.py)
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\nNegative prompt: ugly, fat, obese, "
    "chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, mutation, mutated, (extra_limb), "
    "(ugly), (poorly drawn hands), messy drawing\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, "
    "Size: 512x512, Model hash: 45dee52b",
    # what A1111 1.9 writes with LoRAs, embeddings, hires fix and quoted values
    'a emb cat <lora:test:0.8>, masterpiece\nNegative prompt: <lora:other:0.5>\nSteps: 20, Sampler: DPM++ 2M Karras, '
    'CFG scale: 7, Seed: 3, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: '
    '0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Lora hashes: "test: 0123456789ab, other: '
    'ba9876543210", TI hashes: "emb: 5c1b9a3e2f11", Template: "a \\"quoted\\" one, with: colons", Version: v1.9.4',
    "a prompt on\nmore than one line\nNegative prompt: and a negative\non two\nSteps: 4, Seed: 7, Size: 64x64",
    "just a prompt, with: a colon",
]


def test_the_scanner_finds_what_a1111s_regex_finds_on_random_lines():
    from sdtrt.requests.infotext import find_pairs

    for line in random_strings(INFOTEXT_CHARACTERS, 20_000, 30):
        assert find_pairs(line) == OLD_PAIR.findall(line), line


def test_infotexts_parse_as_before_on_random_texts_and_a1111s_own():
    words = ["Negative prompt:", "Steps", ": ", "3", ", ", "\n", '"', '\\"', "a b", "Size: 64x64", "Seed: 1, ",
             "x-y/z:", " ", ":", ",", "é"]
    rng = random.Random(1)
    texts = ["".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(5_000)]
    texts += list(random_strings(INFOTEXT_CHARACTERS, 5_000, 40, seed=2))
    for text in texts + A1111_INFOTEXTS:
        assert parse_infotext(text) == old_parse_infotext(text), text
    prompt, negative, params = parse_infotext(A1111_INFOTEXTS[4])
    assert negative == "<lora:other:0.5>" and params["Lora hashes"] == "test: 0123456789ab, other: ba9876543210"
    assert params["Template"] == 'a "quoted" one, with: colons' and params["Version"] == "v1.9.4"


def test_what_sdtrt_writes_reads_back():
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1, "Size": "64x64",
              "Lora hashes": "a: 1, b: 2", "Note": 'say "hi"\nthen: go'}
    prompt, negative, read = parse_infotext(build_infotext("a (cat:1.2), [dog|fox]", "blur, fog", params))
    assert (prompt, negative) == ("a (cat:1.2), [dog|fox]", "blur, fog")
    assert read["Lora hashes"] == "a: 1, b: 2" and read["Note"] == 'say "hi"\nthen: go' and read["CFG scale"] == "7"


@pytest.mark.parametrize("name, build", [
    ("one word", lambda n: "a" * n),
    ("words without colons", lambda n: "a " * (n // 2)),
    ("escaped quotes", lambda n: '"' + '\\"' * (n // 2)),
    ("keys without values", lambda n: "k: " * (n // 3)),
    ("unclosed quoted values", lambda n: 'ab: "' * (n // 5)),
    ("whitespace inside", lambda n: "a" + " \t" * (n // 2) + "b"),
    ("hyphens and slashes", lambda n: "a-/" * (n // 3)),
])
def test_a_megabyte_infotext_parses_in_linear_time(name, build):
    assert_linear(parse_infotext, build, MB, name=name)


def test_an_infotext_longer_than_the_limit_is_refused_naming_the_field():
    from sdtrt.requests.infotext import MAX_INFOTEXT_CHARS, check_infotext

    assert check_infotext("a" * MAX_INFOTEXT_CHARS) == "a" * MAX_INFOTEXT_CHARS
    with pytest.raises(InvalidRequest) as refused:
        check_infotext("a" * (MAX_INFOTEXT_CHARS + 1))
    assert refused.value.field == "infotext" and f"at most {MAX_INFOTEXT_CHARS} characters" in str(refused.value)
    assert len(str(refused.value)) < 300  # the value is echoed short
    with pytest.raises(InvalidRequest, match="invalid parameters="):
        check_infotext("a" * (MAX_INFOTEXT_CHARS + 1), field="parameters")


def test_settings_from_a_long_infotext_in_linear_time():
    assert_linear(settings_from_infotext, lambda n: "AND " * (n // 4), KB64, name="AND")
    assert_linear(settings_from_infotext, lambda n: "a (b) [c] " * (n // 10), KB64, name="brackets")


# --- attention (sdtrt.requests.prompts) ------------------------------------------------------------------------------------

def old_parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """sdtrt.requests.prompts' parse before bounding it (A1111's: every closing bracket scales everything after its
    opening one)."""
    from sdtrt.requests.prompts import _TOKEN, BREAK, ROUND, SQUARE

    out, round_open, square_open = [], [], []

    def scale(start, factor):
        for piece in out[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            out.append([token[1], 1.0])
        elif token == "(":
            round_open.append(len(out))
        elif token == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(OLD_BREAK.split(token)):
                if i > 0:
                    out.append(list(BREAK))
                out.append([part, 1.0])
    for start in round_open:
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)
    if not out:
        return [("", 1.0)]
    merged = [out[0]]
    for piece in out[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


PROMPT_WORDS = ["BREAK", "AND", "a", " ", "  ", "\n", "(", ")", "[", "]", ":", "|", "\\", "1", "0.5", ".", "-", "e",
                "x", "1.2", ":1.3)", "<", ">", "<lora:x:0.5>", ",", "\t", "B", "RE", "\\(", "\\]"]


def prompts(count: int, seed: int = 0):
    rng = random.Random(seed)
    characters = list("ab1.:()[]|\\ \n-+e<>,")
    for i in range(count):
        if i % 2:
            yield "".join(rng.choice(characters) for _ in range(rng.randint(0, 30)))
        else:
            yield "".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(0, 16)))


def test_attention_weights_are_the_same_floats_as_before():
    for text in prompts(20_000):
        try:
            expected = old_parse_prompt_attention(text)
        except ValueError:  # "(a:1.2.3)": float() failed; now a clear refusal
            with pytest.raises(InvalidRequest, match="a weight that is one number"):
                parse_prompt_attention(text)
            continue
        assert parse_prompt_attention(text) == expected, text
    assert parse_prompt_attention("((a) b BREAK c:1.3) [d]") == old_parse_prompt_attention("((a) b BREAK c:1.3) [d]")


def test_break_splits_as_a1111s_regex():
    from sdtrt.requests.prompts import split_break

    for text in prompts(20_000, seed=1):
        assert split_break(text) == OLD_BREAK.split(text), text


@pytest.mark.parametrize("name, build", [
    ("spaces", lambda n: " " * n),
    ("spaces then a word", lambda n: "a" + " " * n + "b"),
    ("spaces then a colon", lambda n: "a " + " " * n + ":"),
    ("spaces around BREAK", lambda n: (" " * 1000 + "BREAK") * (n // 1005)),
    ("colons", lambda n: ":" * n),
    ("plain words", lambda n: "a cat, " * (n // 7)),
])
def test_a_64k_prompt_is_weighted_in_linear_time(name, build):
    assert_linear(parse_prompt_attention, build, KB64, name=name)


def test_brackets_deeper_than_the_limit_are_refused_naming_the_field_at_once():
    from sdtrt.requests.prompt_schedule import MAX_BRACKET_DEPTH

    deep = "(" * MAX_BRACKET_DEPTH + "a" + ")" * MAX_BRACKET_DEPTH
    assert parse_prompt_attention(deep) == old_parse_prompt_attention(deep)  # up to the limit: as before
    for text in ["(" * 10_000 + "a" + ")" * 10_000, "[" * 10_000 + "a" + "]" * 10_000, "(:" * (KB64 // 2),
                 "[a:" * (KB64 // 3), "(a" * (KB64 // 2)]:
        start = time.perf_counter()
        with pytest.raises(InvalidRequest) as refused:
            parse_prompt_attention(text, "negative_prompt")
        assert time.perf_counter() - start < 1.0
        assert refused.value.field == "negative_prompt"
        assert f"at most {MAX_BRACKET_DEPTH} brackets" in str(refused.value)


def test_the_worst_prompt_within_the_depth_limit_is_still_bounded():
    """Each piece is multiplied once per bracket around it: at the depth limit, a 64 kB prompt of tiny brackets
    is the most work (groups x depth), a few tenths of a second."""
    from sdtrt.requests.prompt_schedule import MAX_BRACKET_DEPTH

    def deepest(n: int) -> str:
        return "(" * (MAX_BRACKET_DEPTH - 1) + "(a)" * (n // 3 - MAX_BRACKET_DEPTH)

    assert_linear(parse_prompt_attention, deepest, KB64, name="deepest")


# --- prompt editing, alternation and AND (sdtrt.requests.prompt_schedule) -------------------------------------------------

def test_subprompt_weights_as_a1111s_regex():
    words = ["a", " ", ":", "1", ".", "5", "-", "+", "\n", "\t", "x", "AND", "1.5", " :", ": "]
    rng = random.Random(3)
    for _ in range(20_000):
        part = "".join(rng.choice(words) for _ in range(rng.randint(0, 10)))
        if re.search(r"\bAND\b", part):
            continue
        match = OLD_WEIGHTED.match(part)
        expected = (match.group(1), float(match.group(2))) if match.group(2) else (match.group(1), 1.0)
        assert composable_prompts(part) == [expected], part


def test_edit_numbers_as_a1111s_regex():
    from sdtrt.requests.prompt_schedule import _number

    for text in random_strings(list(" 1.e+-5\tx"), 20_000, 12, seed=4):
        match = OLD_NUMBER.fullmatch(text)
        assert _number([text]) == (match.group(1) if match else None), text


@pytest.mark.parametrize("name, build", [
    ("nested [", lambda n: "[" * (n // 6) + "a" + "]" * (n // 6)),
    ("nested (", lambda n: "(" * (n // 6) + "a" + ")" * (n // 6)),
    ("nested edits", lambda n: "[a:" * (n // 6) + "b" + ":1]" * (n // 6)),
    ("unclosed [", lambda n: "[" * n),
    ("unclosed (:", lambda n: "(:" * (n // 2)),
    ("unclosed [a:", lambda n: "[a:" * (n // 3)),
])
def test_deep_nesting_is_plain_text_in_linear_time_not_a_recursion_error(name, build):
    assert_linear(prompt_schedule, build, KB64, 20, name=name)
    text = build(KB64)
    assert prompt_schedule(text, 20) == [(20, text)]


@pytest.mark.parametrize("name, build", [
    ("a long number that is not one", lambda n: "[a:" + "1" * n + "x]"),
    ("long spaces in an edit", lambda n: "[a:" + " " * n + "x]"),
    ("constructs inside open brackets", lambda n: "(" * 99 + "[a]" * (n // 3 - 33)),
    ("many alternations, 150 steps", lambda n: "[a|b]" * (n // 5)),
    ("many edits", lambda n: "".join(f"[a:b:{i % 150}]" for i in range(n // 10))),
])
def test_a_64k_prompt_is_scheduled_in_linear_time(name, build):
    assert_linear(prompt_schedule, build, KB64, 150, name=name)


def test_schedules_are_as_before_on_forms_users_write():
    assert prompt_schedule("a [cat|dog] in [rain:snow:0.5]", 4) == [
        (1, "a cat in rain"), (2, "a dog in rain"), (3, "a cat in snow"), (4, "a dog in snow")]
    assert prompt_schedule("[[a:b:2]|c]", 4) == [(1, "a"), (2, "c"), (3, "b"), (4, "c")]


@pytest.mark.parametrize("name, build", [
    ("spaces then a word", lambda n: " " * n + "x"),
    ("a word, spaces, a colon", lambda n: "a " + " " * n + ":"),
    ("AND", lambda n: "AND " * (n // 4)),
    ("colons and spaces", lambda n: ": " * (n // 2)),
])
def test_a_64k_prompt_is_split_at_and_in_linear_time(name, build):
    assert_linear(composable_prompts, build, KB64, name=name)


# --- extra networks and styles ------------------------------------------------------------------------------------

def test_extra_network_tags_as_a1111s_regex():
    for text in random_strings(list("<>:ab_1 \n,=lo"), 20_000, 24, seed=5):
        assert strip_extra_networks(text) == OLD_EXTRA_NETWORK.sub("", text), text
        found = [(m.group(0), m.group(1), m.group(2)) for m in OLD_EXTRA_NETWORK.finditer(text)]
        from sdtrt.requests.extra_networks import extra_network_tags

        assert [(t.text, t.kind, t.body) for t in extra_network_tags(text)] == found, text


@pytest.mark.parametrize("name, build", [
    ("unclosed tags", lambda n: "<a:" * (n // 3)),
    ("unclosed lora tags", lambda n: "<lora:x" * (n // 7)),
    ("angle brackets", lambda n: "<" * n),
])
def test_a_64k_prompt_has_its_tags_read_in_linear_time(name, build):
    assert_linear(strip_extra_networks, build, KB64, name=name)
    assert_linear(parse_lora_tags, build, KB64, "prompt", name=name)


def test_styles_that_would_grow_a_prompt_past_the_limit_are_refused_before_they_are_applied():
    from sdtrt.requests.styles import MAX_STYLED_PROMPT_CHARS, PromptStyle, apply_styles

    twice = PromptStyle("twice", "{prompt}, {prompt}")
    assert apply_styles("cat", "", [twice]) == ("cat, cat", "")
    start = time.perf_counter()
    with pytest.raises(InvalidRequest) as refused:
        apply_styles("a cat", "", [twice] * 64)  # 2**64 cats, if it were made
    assert time.perf_counter() - start < 1.0
    assert refused.value.field == "styles" and f"at most {MAX_STYLED_PROMPT_CHARS} characters" in str(refused.value)
