"""Triton model ``tokenizer``: prompts -> A1111-weighted 75-token chunks for the text encoder.

Outputs [2k, 77] token ids and weights (the negative prompt's k chunks, then the prompt's, padded to the same
k with empty-prompt chunks), the request's Clip skip once per row, and the vectors of the registered embeddings
the prompts name, at the positions the ids mark (sdtrt/requests/extra_networks.py).
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.model_repository.configs import CLIP_SKIP_ROWS, TOKEN_IDS, TOKEN_WEIGHTS, TOKENIZER_FIELDS
from sdtrt.model_repository.models.triton_io import JsonLog, PerRequestModel, model_spec, repo_root, scalar
from sdtrt.pipeline.text import load_tokenizer
from sdtrt.requests.extra_networks import EMBEDDING_VECTORS, EmbeddingTable
from sdtrt.requests.prompts import text_rows
from sdtrt.requests.request import check_value


class TritonPythonModel(PerRequestModel):
    def initialize(self, args):
        self.spec = model_spec(args)
        self.log = JsonLog(args["model_name"])
        self.tokenizer = load_tokenizer(repo_root(args) / self.spec.tokenizer, self.spec.text_max_length)
        self.embeddings = EmbeddingTable(repo_root(args), self.spec.embeddings, self.tokenizer, self.spec.text_hidden_size)
        self._rows("warm up", "")  # the first call pays for lazy setup
        self.log.info("ready", tokenizer=self.spec.tokenizer, max_chunks=self.spec.max_chunks,
                      embeddings=sorted(self.spec.embeddings))

    def _rows(self, prompt: str, negative_prompt: str):
        return text_rows(self.tokenizer, prompt, negative_prompt, self.spec.max_chunks, self.spec.text_hidden_size,
                         self.embeddings)

    def run(self, request) -> "pb_utils.InferenceResponse":
        values = {}
        for name in TOKENIZER_FIELDS:
            field, value = self.spec.field(name), scalar(request, name)
            values[name] = check_value(field, field.default if value is None else value)
        rows = self._rows(values["prompt"], values["negative_prompt"])
        skip = np.full((len(rows.ids), 1), values["clip_skip"], dtype=np.int32)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(TOKEN_IDS, rows.ids), pb_utils.Tensor(TOKEN_WEIGHTS, rows.weights),
            pb_utils.Tensor(CLIP_SKIP_ROWS, skip), pb_utils.Tensor(EMBEDDING_VECTORS, rows.vectors),
        ])
