"""Triton model ``tokenizer``: prompts -> A1111-weighted 75-token chunks for the text encoder.

Outputs [2k, 77] token ids and weights (the negative prompt's k chunks, then the prompt's, padded to the same
k with empty-prompt chunks) and the request's Clip skip once per row.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.model_repository.configs import CLIP_SKIP_ROWS, TOKEN_IDS, TOKEN_WEIGHTS, TOKENIZER_FIELDS
from sdtrt.model_repository.triton_io import JsonLog, PerRequestModel, model_spec, repo_root, scalar
from sdtrt.prompts import prompt_rows
from sdtrt.request import check_value
from sdtrt.text import load_tokenizer


class TritonPythonModel(PerRequestModel):
    def initialize(self, args):
        self.spec = model_spec(args)
        self.log = JsonLog(args["model_name"])
        self.tokenizer = load_tokenizer(repo_root(args) / self.spec.tokenizer, self.spec.text_max_length)
        prompt_rows(self.tokenizer, "warm up", "", self.spec.max_chunks)  # the first call pays for lazy setup
        self.log.info("ready", tokenizer=self.spec.tokenizer, max_chunks=self.spec.max_chunks)

    def run(self, request) -> "pb_utils.InferenceResponse":
        values = {}
        for name in TOKENIZER_FIELDS:
            field, value = self.spec.field(name), scalar(request, name)
            values[name] = check_value(field, field.default if value is None else value)
        ids, weights = prompt_rows(self.tokenizer, values["prompt"], values["negative_prompt"], self.spec.max_chunks)
        skip = np.full((len(ids), 1), values["clip_skip"], dtype=np.int32)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(TOKEN_IDS, ids), pb_utils.Tensor(TOKEN_WEIGHTS, weights), pb_utils.Tensor(CLIP_SKIP_ROWS, skip),
        ])
