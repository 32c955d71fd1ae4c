"""Triton model ``tokenizer``: one text pair of a request's plan -> A1111-weighted 75-token chunks for the text
encoder.

It takes the pair as the plan read it (sdtrt.requests.plan): each text's weighted pieces, extra-network tags already
out, so nothing here parses a prompt again. Outputs [2k, 77] token ids and weights (the negative prompt's k chunks,
then the prompt's, padded to the same k with empty-prompt chunks), the request's Clip skip once per row, and the
vectors of the registered embeddings the texts name, at the positions the ids mark (sdtrt/requests/extra_networks.py).
"""

from __future__ import annotations

import math

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.contract.errors import InvalidRequest
from sdtrt.model_repository.configs import (
    CLIP_SKIP_ROWS,
    NEGATIVE_PIECES,
    PIECE_TEXTS,
    PIECE_WEIGHTS,
    TOKEN_IDS,
    TOKEN_WEIGHTS,
    TOKENIZER_FIELDS,
)
from sdtrt.model_repository.models.triton_io import JsonLog, PerRequestModel, model_spec, optional_input, repo_root, scalar
from sdtrt.pipeline.text import load_tokenizer
from sdtrt.requests.extra_networks import EMBEDDING_VECTORS, EmbeddingTable
from sdtrt.requests.prompts import COMMA_BACKTRACK, Pieces, attention_pieces, piece_rows
from sdtrt.requests.request import check_value


class TritonPythonModel(PerRequestModel):
    def initialize(self, args):
        self.spec = model_spec(args)
        self.log = JsonLog(args["model_name"])
        self.tokenizer = load_tokenizer(repo_root(args) / self.spec.tokenizer, self.spec.text_max_length)
        self.embeddings = EmbeddingTable(repo_root(args), self.spec.embeddings, self.tokenizer, self.spec.text_hidden_size)
        # a text pair's pieces are at most both prompts' characters (and a piece more each, for an empty one)
        self.max_chars = self.spec.field("prompt").max_length + self.spec.field("negative_prompt").max_length
        self._rows(attention_pieces("warm up"), attention_pieces(""))  # the first call pays for lazy setup
        self.log.info("ready", tokenizer=self.spec.tokenizer, max_chunks=self.spec.max_chunks,
                      embeddings=sorted(self.spec.embeddings))

    def _rows(self, prompt: Pieces, negative: Pieces, backtrack: int = COMMA_BACKTRACK):
        return piece_rows(self.tokenizer, prompt, negative, self.spec.max_chunks, self.spec.text_hidden_size,
                          self.embeddings, backtrack)

    def pieces(self, request) -> tuple[Pieces, Pieces]:
        """(prompt, negative prompt) pieces as the job model sent them, each input checked by name."""
        texts, weights = optional_input(request, PIECE_TEXTS), optional_input(request, PIECE_WEIGHTS)
        if texts is None or weights is None or texts.shape != weights.shape:
            raise InvalidRequest(PIECE_WEIGHTS, None if weights is None else list(weights.shape),
                                 f"one weight per piece of {PIECE_TEXTS}, both given")
        texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t) for t in texts.reshape(-1)]
        if len(texts) > self.max_chars + 2 or sum(map(len, texts)) > self.max_chars:
            raise InvalidRequest(PIECE_TEXTS, f"<{len(texts)} pieces>", f"at most {self.max_chars} characters "
                                 "in all (the prompt's and the negative prompt's limits)")
        weights = [float(w) for w in weights.reshape(-1)]
        if not all(math.isfinite(w) for w in weights):
            raise InvalidRequest(PIECE_WEIGHTS, "<not finite>", "finite weights")
        negative = scalar(request, NEGATIVE_PIECES)
        if negative is None or not 0 <= negative <= len(texts):
            raise InvalidRequest(NEGATIVE_PIECES, negative, f"from 0 to {len(texts)} (the pieces sent)")
        pieces = tuple(zip(texts, weights))
        return pieces[negative:] or (("", 1.0),), pieces[:negative] or (("", 1.0),)

    def run(self, request) -> "pb_utils.InferenceResponse":
        values = {}
        for name in TOKENIZER_FIELDS:
            field, value = self.spec.field(name), scalar(request, name)
            values[name] = check_value(field, field.default if value is None else value)
        rows = self._rows(*self.pieces(request), values["comma_padding_backtrack"])
        skip = np.full((len(rows.ids), 1), self.spec.encoder_clip_skip(values["clip_skip"],
                                                                      bool(values["sdxl_clip_l_skip"])), dtype=np.int32)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(TOKEN_IDS, rows.ids), pb_utils.Tensor(TOKEN_WEIGHTS, rows.weights),
            pb_utils.Tensor(CLIP_SKIP_ROWS, skip), pb_utils.Tensor(EMBEDDING_VECTORS, rows.vectors),
        ])
