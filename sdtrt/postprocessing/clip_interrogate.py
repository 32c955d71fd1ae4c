"""A1111's CLIP interrogator at work on a picture (modules/interrogate.py): BLIP's caption, then the best lines of
each category file as CLIP ranks them against the picture, the networks themselves callables on the server.

A1111's steps, kept:
- BLIP sees the picture resized to its size (384 x 384, bicubic) and normalised with CLIP's mean and deviation;
  its caption is decoded from the prompt "a picture of " as A1111's transformers (4.30) generate() decodes it:
  greedy for one beam, else beam search (length penalty 1 over the whole sequence, the prompt included, no early
  stop), the separator barred below the minimum length, at most the maximum length of tokens; the words are
  BERT's WordPiece tokens joined and cleaned up as its tokenizer decodes them, the prompt cut off the front.
- CLIP sees the picture as openai's preprocessing gives it (the short side resized to 224, bicubic, the centre
  cut out); each category's lines (the first ``interrogate_clip_dict_limit``, 0: all) are ranked by the softmax
  of 100 x the cosine similarity, its top n (``name.topN.txt``) appended, with A1111's option for ranks as
  ``(line:0.123)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.spec import CAPTION_BEAMS, CAPTION_LENGTH

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP's and CLIP's normalisation, as A1111 gives both
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLIP_PROMPT = "a picture of "
Decode = Callable[[np.ndarray], np.ndarray]  # token ids [rows, tokens] int64 -> the next token's logits [rows, vocab]
Features = Callable[[np.ndarray], np.ndarray]  # category rows [n] int64 -> CLIP's unit text features [n, dim]
_TOPN = re.compile(r"\.top(\d+)\.")  # A1111's re_topn, searched in a category file's stem
# transformers' clean_up_tokenization: the spaces its tokenizers' decode() takes out
_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
              (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


@dataclass(frozen=True)
class ClipInterrogatorOptions:
    """A1111's options for its CLIP interrogator, with its defaults (their limits: its sliders)."""

    num_beams: int = 1  # interrogate_clip_num_beams (1..16)
    min_length: int = 24  # interrogate_clip_min_length (1..128)
    max_length: int = 48  # interrogate_clip_max_length (1..256)
    dict_limit: int = 1500  # interrogate_clip_dict_limit (0: every line)
    skip_categories: tuple[str, ...] = ()  # interrogate_clip_skip_categories
    ranks: bool = False  # interrogate_return_ranks

    @classmethod
    def of(cls, options: dict, longest: int = CAPTION_LENGTH[1]) -> "ClipInterrogatorOptions":
        """From A1111's option keys (missing ones: its defaults), each within A1111's slider (the caption's length
        also within what the export's decoder takes, ``longest``), or InvalidRequest naming the option."""
        d = cls()
        limits = {"interrogate_clip_num_beams": (d.num_beams, *CAPTION_BEAMS),
                  "interrogate_clip_min_length": (d.min_length, 1, 128),
                  "interrogate_clip_max_length": (d.max_length, 1, min(CAPTION_LENGTH[1], longest)),
                  "interrogate_clip_dict_limit": (d.dict_limit, 0, 1 << 31)}
        numbers = []
        for key, (default, lo, hi) in limits.items():
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi \
                    or value != int(value):
                raise InvalidRequest(key, value, f"a whole number in [{lo}, {hi}]")
            numbers.append(int(value))
        skip = options.get("interrogate_clip_skip_categories", d.skip_categories) or ()
        if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
            raise InvalidRequest("interrogate_clip_skip_categories", skip, "a list of category names")
        return cls(*numbers, tuple(skip), bool(options.get("interrogate_return_ranks", d.ranks)))


@dataclass(frozen=True)
class Words:
    """BLIP's side of the tokenizer, as the export wrote it: the vocabulary (id -> WordPiece), the prompt's ids
    (the bos token first, the separator dropped), the separator (BLIP's end of caption) and the ids decode() skips."""

    vocab: Sequence[str]
    prompt: Sequence[int]
    sep: int
    special: frozenset[int]

    @classmethod
    def of(cls, entry: dict) -> "Words":
        return cls(entry["vocab"], entry["prompt"], int(entry["sep"]), frozenset(entry["special"]))

    def decode(self, ids: Sequence[int]) -> str:
        """BERT's decode(ids, skip_special_tokens=True), cleaned up as its tokenizer does by default."""
        text = " ".join(self.vocab[i] for i in ids if i not in self.special).replace(" ##", "").strip()
        for spaced, tight in _CLEAN_UPS:
            text = text.replace(spaced, tight)
        return text


def category_topn(stem: str) -> int:
    """How many lines of a category A1111 appends: N for a file named ``name.topN.something.txt``, else 1."""
    found = _TOPN.search(stem)
    return 1 if found is None else int(found.group(1))


def normalised(picture: Image.Image) -> np.ndarray:
    """torchvision's ToTensor then Normalize with CLIP's numbers: [1, 3, H, W] float32."""
    array = np.asarray(picture, dtype=np.float32).transpose(2, 0, 1) / 255
    mean, std = (np.array(v, dtype=np.float32).reshape(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return np.expand_dims((array - mean) / std, 0).astype(np.float32)


def blip_picture(image: Image.Image, size: int) -> np.ndarray:
    """BLIP's input: Resize((size, size), bicubic) on the picture itself."""
    return normalised(image.resize((size, size), resample=Image.Resampling.BICUBIC))


def clip_picture(image: Image.Image, size: int) -> np.ndarray:
    """openai CLIP's preprocessing: Resize(size) (short side, bicubic), CenterCrop(size), RGB, normalised."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    long = int(size * long / short)
    resized = image.resize((size, long) if w <= h else (long, size), resample=Image.Resampling.BICUBIC)
    left, top = int(round((resized.width - size) / 2.0)), int(round((resized.height - size) / 2.0))
    return normalised(resized.crop((left, top, left + size, top + size)).convert("RGB"))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy_caption(decode: Decode, words: Words, min_length: int, max_length: int) -> list[int]:
    """generate(num_beams=1): the likeliest token each step until the separator or max_length tokens (at least
    one step, as transformers takes)."""
    ids = list(words.prompt)
    while True:
        logits = np.array(decode(np.array([ids], dtype=np.int64))[0], dtype=np.float32)
        if len(ids) < min_length:
            logits[words.sep] = -np.inf
        ids.append(int(np.argmax(logits)))
        if ids[-1] == words.sep or len(ids) >= max_length:
            return ids


@dataclass
class _Finished:
    """transformers 4.30's BeamHypotheses: the best ``beams`` finished captions, each scored by its log-probability
    over its length to the power of the length penalty."""

    beams: int
    penalty: float
    found: list[tuple[float, list[int]]]
    worst: float = 1e9

    def add(self, ids: list[int], logprob: float) -> None:
        score = logprob / (len(ids) ** self.penalty)
        if len(self.found) < self.beams or score > self.worst:
            self.found.append((score, ids))
            if len(self.found) > self.beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.found))
                del self.found[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_logprob: float, length: int) -> bool:
        return len(self.found) >= self.beams and self.worst >= best_logprob / length ** self.penalty


def beam_caption(decode: Decode, words: Words, beams: int, min_length: int, max_length: int,
                 length_penalty: float = 1.0) -> list[int]:
    """generate(num_beams=beams) as transformers 4.30 ran it (A1111's pin): 2 x beams candidates a step over
    every beam's log-softmax, a separator among the first ``beams`` of them finishing its caption."""
    rows = [list(words.prompt) for _ in range(beams)]
    scores = np.full(beams, -1e9, dtype=np.float32)
    scores[0] = 0
    finished, done = _Finished(beams, length_penalty, []), False
    while True:
        logp = _log_softmax(np.array(decode(np.array(rows, dtype=np.int64)), dtype=np.float32))
        length = len(rows[0])
        if length < min_length:
            logp[:, words.sep] = -np.inf
        total = (logp + scores[:, None]).reshape(-1)
        top = np.argsort(-total, kind="stable")[:2 * beams]
        vocab = logp.shape[1]
        next_rows, next_scores = [], []
        for rank, flat in enumerate(top):
            row, token = divmod(int(flat), vocab)
            if token == words.sep:
                if rank < beams:
                    finished.add(rows[row], float(total[flat]))
            else:
                next_rows.append(rows[row] + [token])
                next_scores.append(total[flat])
            if len(next_rows) == beams:
                break
        done = done or finished.done(float(total[top].max()), length)
        rows, scores = next_rows, np.array(next_scores, dtype=np.float32)
        if done or len(rows[0]) >= max_length:
            break
    if not done:
        for row, score in zip(rows, scores):
            finished.add(row, float(score))
    return max(finished.found, key=lambda found: found[0])[1]


@dataclass(frozen=True)
class ClipNetworks:
    """The CLIP interrogator's four networks as callables (the server's, or in-process ones)."""

    blip_vision: Callable[[np.ndarray], np.ndarray]  # BLIP's picture [1, 3, S, S] -> its ViT's tokens [1, N, W]
    blip_decoder: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ids [rows, T], the tokens) -> logits [rows, V]
    clip_image: Callable[[np.ndarray], np.ndarray]  # CLIP's picture [1, 3, R, R] -> unit image features [1, D]
    clip_text: Features


class CachedFeatures:
    """CLIP's features of category rows, each computed once (they follow from the export alone), ``a_call`` rows
    a call: A1111 encodes every line of every category on each interrogation; a server need not."""

    def __init__(self, features: Features, a_call: int):
        self.features, self.a_call, self.rows = features, a_call, {}

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        missing = [int(r) for r in rows if int(r) not in self.rows]
        for start in range(0, len(missing), self.a_call):
            chunk = missing[start:start + self.a_call]
            for row, vector in zip(chunk, self.features(np.array(chunk, dtype=np.int64))):
                self.rows[row] = vector
        return np.stack([self.rows[int(r)] for r in rows]) if len(rows) else np.zeros((0, 0), np.float32)


def blip_caption(image: Image.Image, nets: ClipNetworks, entry: dict, options: ClipInterrogatorOptions) -> str:
    """BLIP's caption of the picture: the decoded words after A1111's prompt."""
    words = Words.of(entry)
    embeds = nets.blip_vision(blip_picture(image, int(entry["blip_size"])))

    def decode(ids: np.ndarray) -> np.ndarray:
        return nets.blip_decoder(ids, embeds)

    if options.num_beams == 1:
        ids = greedy_caption(decode, words, options.min_length, options.max_length)
    else:
        ids = beam_caption(decode, words, options.num_beams, options.min_length, options.max_length)
    return words.decode(ids)[len(BLIP_PROMPT):]


def clip_interrogate(image: Image.Image, nets: ClipNetworks, entry: dict,
                     options: ClipInterrogatorOptions = ClipInterrogatorOptions()) -> str:
    """A1111's interrogate(): BLIP's caption, then each category's best lines by CLIP (the spec's entry: its
    vocabulary, sizes and categories, each with its lines, top n and first row of CLIP's text network)."""
    out = blip_caption(image, nets, entry, options)
    features = nets.clip_image(clip_picture(image, int(entry["clip_size"])))
    for category in entry["categories"]:
        lines = category["lines"]
        if category["name"] in options.skip_categories or not lines:
            continue
        count = len(lines) if options.dict_limit == 0 else min(len(lines), options.dict_limit)
        texts = nets.clip_text(np.arange(category["first"], category["first"] + count, dtype=np.int64))
        for line, score in ranked(features, texts, lines[:count], int(category["topn"])):
            out += f", ({line}:{score / 100:.3f})" if options.ranks else f", {line}"
    return out


def ranked(features: np.ndarray, text_features: np.ndarray, lines: Sequence[str], top: int) -> list[tuple[str, float]]:
    """A1111's rank(): (line, its probability x 100) for the ``top`` likeliest lines."""
    logits = 100.0 * features.astype(np.float32) @ text_features.astype(np.float32).T  # [images, lines]
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    similarity = (shifted / shifted.sum(axis=-1, keepdims=True)).mean(axis=0)
    order = np.argsort(-similarity, kind="stable")[:min(top, len(lines))]
    return [(lines[i], float(similarity[i]) * 100) for i in order]
