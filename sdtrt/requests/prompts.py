"""AUTOMATIC1111 prompt syntax: attention weights, BREAK, 75-token chunks, and weighted CLIP embeddings.

What A1111 does, and so what sdtrt does:
  * ``(x)`` multiplies x's weight by 1.1, ``((x))`` by 1.21, ``[x]`` divides it by 1.1, ``(x:1.3)`` sets 1.3
    (times any enclosing brackets), ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal; unclosed brackets apply
    to the end of the prompt.
  * The prompt is tokenized fragment by fragment and cut into chunks of 75 tokens, each sent to CLIP as
    BOS + up to 75 tokens + EOS, padded to 77 (with EOS for SD 1.x's CLIP, with "!" for SD 2.x's OpenCLIP).
    A chunk that fills up within 20 tokens after a comma is cut at that
    comma instead, and ``BREAK`` starts a new chunk.
  * Each chunk's CLIP output is multiplied token by token by its weights, then rescaled so that its mean is
    what it was before weighting. The chunks are concatenated: 120 tokens -> 2 chunks -> 154 positions.
  * ``<lora:...>`` tags are removed before tokenizing (sdtrt/requests/extra_networks.py applies them); a registered
    embedding's name becomes its vectors, each counting as a token.
  * The prompt and the negative prompt are encoded side by side, the shorter padded with chunks of the empty
    prompt. Those chunks are weighted PADDING_WEIGHT throughout: a constant weight is undone by the mean
    restore (their encoding is the empty prompt's, bit for bit), and it tells them from the text's own chunks,
    so that the U-Net can take each text at its own length (A1111's default) or padded (its "Pad prompt/negative
    prompt to be same length").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests.extra_networks import EMBEDDING_MARK, strip_extra_networks
from sdtrt.requests.prompt_schedule import MAX_BRACKET_DEPTH

if TYPE_CHECKING:
    from sdtrt.requests.extra_networks import EmbeddingTable

CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS
PADDING_WEIGHT = 2.0  # the weight of every position of a padding chunk (a power of two: undone exactly)
COMMA_BACKTRACK = 20  # A1111's "pad from the last comma within n tokens" default
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ("BREAK", -1.0)
Pieces = tuple[tuple[str, float], ...]  # a text as parse_prompt_attention reads it: (text, weight), BREAK as above

_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]          # an escaped bracket or backslash: literal
  | \\                    # a lone backslash: literal
  | \(                    # open round
  | \[                    # open square
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)" closes a round bracket with an explicit weight
  | \)                    # close round
  | \]                    # close square
  | [^\\()\[\]:]+         # plain text
  | :                     # a colon that is not a weight
    """,
    re.X,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")
_SPACES = re.compile(r"\s*")


def split_break(text: str) -> list[str]:
    r"""``re.split(r"\s*\bBREAK\b\s*", text)`` (A1111's re_break) in linear time: the regex, retried at each
    position of a long run of spaces, ran to the end of the run each time. A match starts where the whitespace
    before a whole-word BREAK starts (not before the previous match's end) and takes the whitespace after it."""
    if "BREAK" not in text:
        return [text]
    parts, pos = [], 0
    for word in _BREAK_WORD.finditer(text):
        parts.append(text[pos:word.start()].rstrip())  # str.isspace is \s, character for character
        pos = _SPACES.match(text, word.end()).end()
    parts.append(text[pos:])
    return parts


# A1111's emphasis modes (its option "emphasis", modules/sd_emphasis.py): Original weights each chunk and restores
# its mean, "No norm" weights it only, "Ignore" parses the brackets but weighs nothing, "None" reads them as text.
EMPHASES = ("Original", "No norm", "Ignore", "None")


def emphasis_pieces(text: str, field: str, emphasis: str = "Original") -> Pieces:
    """A text's pieces as A1111's emphasis mode has its tokenizer read them (tokenize_line): parsed, then weighed
    1 where the mode ignores emphasis, or the whole text as one piece of weight 1 (BREAK too) where it has none."""
    if emphasis == "None":
        return ((text, 1.0),)
    pieces = tuple(parse_prompt_attention(text, field))
    if emphasis == "Ignore":
        return tuple(piece if piece == BREAK else (piece[0], 1.0) for piece in pieces)
    return pieces


def parse_prompt_attention(text: str, field: str = "prompt") -> list[tuple[str, float]]:
    """A1111's parse: [(text, weight), ...] with equal neighbours merged; BREAK as ("BREAK", -1).

    A1111 multiplies every piece after an opening bracket by the bracket's factor when it closes. Pieces added with
    no bracket opened or closed between them always get the same factors, so they share one weight ("group"), each
    multiplied in A1111's order (the same floats), and the work is the groups times the brackets open around them:
    at most MAX_BRACKET_DEPTH open at once, beyond which the prompt is refused naming ``field``."""
    pieces: list[tuple[str, int, bool]] = []  # (text, group, is BREAK)
    groups: list[float] = []  # each group's weight so far
    boundary = True  # a bracket opened or closed since the last piece: the next piece starts a group
    round_open: list[int] = []  # the first group inside each open bracket
    square_open: list[int] = []

    def add(part: str, is_break: bool = False) -> None:
        nonlocal boundary
        if boundary:
            groups.append(1.0)
            boundary = False
        pieces.append((part, len(groups) - 1, is_break))

    def scale(start: int, factor: float) -> None:
        nonlocal boundary
        groups[start:] = [weight * factor for weight in groups[start:]]
        boundary = True

    def open_bracket(stack: list[int]) -> None:
        nonlocal boundary
        if len(round_open) + len(square_open) >= MAX_BRACKET_DEPTH:
            raise InvalidRequest(field, text, f"at most {MAX_BRACKET_DEPTH} brackets ( or [ open at once (write "
                                 "\\( or \\[ for a literal bracket)")
        stack.append(len(groups))
        boundary = True

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            add(token[1])
        elif token == "(":
            open_bracket(round_open)
        elif token == "[":
            open_bracket(square_open)
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "(a:1.2.3)", "(a:.)": A1111 fails on these too
                raise InvalidRequest(field, match.group(0), "a weight that is one number, as in (word:1.2)") from None
            scale(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            scale(square_open.pop(), SQUARE)
        elif "BREAK" not in token:
            add(token)
        else:
            for i, part in enumerate(split_break(token)):
                if i > 0:
                    add(BREAK[0], is_break=True)
                add(part)
    for start in round_open:  # unclosed brackets reach the end of the prompt
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    if not pieces:
        return [("", 1.0)]
    # A BREAK starts at -1 and gets its group's factors: -(1 * f1 * f2 ...), exactly, as rounding keeps signs.
    # (each merged text's parts are joined once at the end: adding to a growing string copies it every time)
    merged: list[tuple[list[str], float]] = []
    for part, g, is_break in pieces:
        weight = -groups[g] if is_break else groups[g]
        if merged and merged[-1][1] == weight:
            merged[-1][0].append(part)
        else:
            merged.append(([part], weight))
    return [("".join(parts), w) for parts, w in merged]


@dataclass
class Chunks:
    ids: np.ndarray  # [k, 77] int32: BOS, tokens, EOS, padding; EMBEDDING_MARK where an embedding's vector is
    weights: np.ndarray  # [k, 77] float32: 1.0 on BOS/EOS/padding
    tokens: int  # prompt tokens before padding (A1111 shows this count)
    vectors: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (chunk, position) -> embedding vector


def attention_pieces(text: str, field: str = "prompt") -> Pieces:
    """What the tokenizer takes of a prompt: its weighted pieces, ``<lora:...>`` tags taken out first."""
    return tuple(parse_prompt_attention(strip_extra_networks(text), field))


def chunk_prompt(tokenizer, text: str, max_chunks: int, field: str = "prompt",
                 embeddings: "EmbeddingTable | None" = None) -> Chunks:
    """Tokenize a prompt into A1111's weighted 75-token chunks (``chunk_pieces`` of its ``attention_pieces``)."""
    return chunk_pieces(tokenizer, attention_pieces(text, field), max_chunks, field, embeddings)


def chunk_pieces(tokenizer, parsed: Pieces, max_chunks: int, field: str = "prompt",
                 embeddings: "EmbeddingTable | None" = None, backtrack: int = COMMA_BACKTRACK) -> Chunks:
    """A parsed prompt's pieces as A1111's weighted 75-token chunks: an embedding's name becomes its vectors
    (never split across two chunks), as in A1111; a chunk that fills up within ``backtrack`` tokens after a comma
    is cut there (A1111's comma_padding_backtrack; 0: never). ``field`` names the prompt in errors."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, pad_id(tokenizer)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    texts = [t for t, w in parsed if (t, w) != BREAK]
    token_lists = iter(tokenizer(texts, add_special_tokens=False, truncation=False).input_ids if texts else [])

    chunks_ids: list[list[int]] = []
    chunks_weights: list[list[float]] = []
    vectors: dict[tuple[int, int], np.ndarray] = {}
    ids: list[int] = []
    weights: list[float] = []
    vecs: list[np.ndarray | None] = []  # the embedding vector of each position of the open chunk, if any
    last_comma = -1
    total = 0

    def close_chunk() -> None:
        nonlocal ids, weights, vecs, last_comma
        vectors.update({(len(chunks_ids), 1 + i): v for i, v in enumerate(vecs) if v is not None})
        chunks_ids.append([bos] + ids + [eos] + [pad] * (CHUNK_TOKENS - len(ids)))
        chunks_weights.append([1.0] + weights + [1.0] * (CHUNK_TOKENS + 1 - len(ids)))
        ids, weights, vecs, last_comma = [], [], [], -1

    for text_part, weight in parsed:
        if (text_part, weight) == BREAK:
            close_chunk()
            continue
        tokens = next(token_lists)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1  # move what follows the comma to the next chunk
                moved = ids[cut:], weights[cut:], vecs[cut:]
                ids, weights, vecs = ids[:cut], weights[:cut], vecs[:cut]
                close_chunk()
                ids, weights, vecs = (list(m) for m in moved)
            if len(ids) == CHUNK_TOKENS:
                close_chunk()
            found = embeddings.at(tokens, position) if embeddings is not None else None
            if found is None:
                ids.append(token)
                weights.append(weight)
                vecs.append(None)
                total += 1
                position += 1
                continue
            name, spanned = found
            vector = embeddings.vectors[name]
            if len(ids) + len(vector) > CHUNK_TOKENS:
                close_chunk()
            ids += [EMBEDDING_MARK] * len(vector)
            weights += [weight] * len(vector)
            vecs += list(vector)
            total += len(vector)
            position += spanned
    if ids or not chunks_ids:
        close_chunk()
    if len(chunks_ids) > max_chunks:
        raise InvalidRequest(
            field, f"<{total} tokens in {len(chunks_ids)} chunks>",
            f"at most {max_chunks} chunks of {CHUNK_TOKENS} tokens (re-export with a larger --max-chunks for longer prompts)",
        )
    return Chunks(np.array(chunks_ids, dtype=np.int32), np.array(chunks_weights, dtype=np.float32), total, vectors)


def pad_id(tokenizer) -> int:
    """What follows a chunk's end of text, as A1111 fills it: the end-of-text token again for CLIP (SD 1.x), the
    tokenizer's own padding (id 0, "!") for OpenCLIP (SD 2.x), whose end and padding tokens differ."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def empty_chunk(tokenizer) -> Chunks:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = np.array([[bos, eos] + [pad_id(tokenizer)] * CHUNK_TOKENS], dtype=np.int32)
    return Chunks(ids, np.ones(ids.shape, dtype=np.float32), 0)


@dataclass
class TextRows:
    """What the text encoder takes for one request: the negative prompt's chunks, then the prompt's."""

    ids: np.ndarray  # [2k, 77] int32
    weights: np.ndarray  # [2k, 77] float32
    vectors: np.ndarray  # [2k, 77, H] float32: embedding vectors where ids is EMBEDDING_MARK, zeros elsewhere


def pair_chunks(tokenizer, negative: Chunks, prompt: Chunks, hidden: int = 0) -> TextRows:
    """Rows for the text encoder: negative's chunks then the prompt's, both padded to the same count."""
    k = max(len(negative.ids), len(prompt.ids))
    empty = empty_chunk(tokenizer)

    def padded(c: Chunks) -> tuple[np.ndarray, np.ndarray]:
        extra = k - len(c.ids)
        padding = np.full_like(empty.weights, PADDING_WEIGHT)
        return (np.concatenate([c.ids] + [empty.ids] * extra), np.concatenate([c.weights] + [padding] * extra))

    (neg_ids, neg_w), (pos_ids, pos_w) = padded(negative), padded(prompt)
    vectors = np.zeros((2 * k, CHUNK_TOKENS + 2, hidden), dtype=np.float32)
    for offset, chunks in ((0, negative), (k, prompt)):
        for (row, position), vector in chunks.vectors.items():
            vectors[offset + row, position] = vector
    return TextRows(np.concatenate([neg_ids, pos_ids]), np.concatenate([neg_w, pos_w]), vectors)


def text_rows(tokenizer, prompt: str, negative_prompt: str, max_chunks: int, hidden: int,
              embeddings: "EmbeddingTable | None" = None) -> TextRows:
    """Token ids, weights and embedding vectors for the text encoder: the negative prompt's chunks, then the
    prompt's."""
    return piece_rows(tokenizer, attention_pieces(prompt, "prompt"), attention_pieces(negative_prompt, "negative_prompt"),
                      max_chunks, hidden, embeddings)


def piece_rows(tokenizer, prompt: Pieces, negative: Pieces, max_chunks: int, hidden: int,
               embeddings: "EmbeddingTable | None" = None, backtrack: int = COMMA_BACKTRACK) -> TextRows:
    """``text_rows`` of two texts already parsed (a plan's ``TextPair``)."""
    negative_chunks = chunk_pieces(tokenizer, negative, max_chunks, "negative_prompt", embeddings, backtrack)
    return pair_chunks(tokenizer, negative_chunks,
                       chunk_pieces(tokenizer, prompt, max_chunks, "prompt", embeddings, backtrack), hidden)


def prompt_rows(tokenizer, prompt: str, negative_prompt: str, max_chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and weights [2k, 77] for the text encoder (no embeddings)."""
    rows = text_rows(tokenizer, prompt, negative_prompt, max_chunks, 0)
    return rows.ids, rows.weights


def text_chunks(weights: np.ndarray) -> tuple[int, int]:
    """(the negative prompt's chunks, the prompt's) of a pair's [2k, 77] weights, their padding left out."""
    k = len(weights) // 2
    own = weights[:, 0] != PADDING_WEIGHT  # a text's own chunk weighs its start 1
    return int(own[:k].sum()), int(own[k:].sum())


def apply_weights(embeddings: np.ndarray, weights: np.ndarray, normalize: bool = True) -> np.ndarray:
    """[2k, 77, H] chunk embeddings x [2k, 77] weights -> [2, 77k, H] (negative, prompt).

    Each chunk is weighted token by token and rescaled to its original mean, as A1111 does per chunk; without
    ``normalize`` (A1111's emphasis "No norm") only weighted, the padding chunks left as they are.
    """
    rows = embeddings.shape[0]
    z = embeddings.astype(np.float32)
    if normalize:
        original_mean = z.mean(axis=(1, 2), keepdims=True)
        z = z * weights[:, :, None]
        z = z * (original_mean / z.mean(axis=(1, 2), keepdims=True))
    else:
        z = z * np.where(weights[:, :1] == PADDING_WEIGHT, np.float32(1.0), weights)[:, :, None]
    k = rows // 2
    return z.reshape(2, k * z.shape[1], z.shape[2])
