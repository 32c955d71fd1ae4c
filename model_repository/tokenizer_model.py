"""Triton model ``tokenizer``: prompt and negative prompt -> CLIP token ids [2, 77] (row 0 negative, row 1 prompt)."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from sdtrt.model_repository.configs import TOKEN_IDS
from sdtrt.model_repository.triton_io import JsonLog, error_response, model_spec, repo_root, scalar
from sdtrt.text import load_tokenizer, tokenize


class TritonPythonModel:
    def initialize(self, args):
        self.spec = model_spec(args)
        self.log = JsonLog(args["model_name"])
        self.tokenizer = load_tokenizer(repo_root(args) / self.spec.tokenizer, self.spec.text_max_length)
        self.log.info("ready", tokenizer=self.spec.tokenizer)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prompt, negative = (scalar(request, name) or "" for name in ("prompt", "negative_prompt"))
                ids = tokenize(self.tokenizer, [negative, prompt], self.spec.text_max_length)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(TOKEN_IDS, ids.astype(np.int32))]))
            except Exception as exc:  # a bad request must never take the model down
                self.log.warn("bad_request", error=str(exc))
                responses.append(error_response(f"tokenizer: {exc}"))
        return responses
