"""Triton model ``scheduler``: the denoising loop, with one BLS call to the ``unet`` model per step.

Each instance runs one request's loop at a time; several instances (``instance_group``) run several loops,
and Triton's dynamic batcher on ``unet`` merges their steps into shared U-Net calls. Each request gets its
own scheduler object, generators and response, so images never cross between requests.
"""

from __future__ import annotations

import time

import torch
import triton_python_backend_utils as pb_utils

from sdtrt.denoise import txt2img_latents
from sdtrt.errors import InvalidRequest
from sdtrt.model_repository.configs import DECODER_LATENTS, EMBEDDINGS, SEEDS, TOKEN_WEIGHTS, scheduler_fields
from sdtrt.model_repository.triton_io import JsonLog, error_response, model_spec, scalar
from sdtrt.prompts import apply_weights
from sdtrt.request import Txt2ImgRequest, resolve_seeds, validate


class Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        self.spec = model_spec(args)
        self.log = JsonLog(args["model_name"])
        unet = self.spec.component("unet")
        self.unet_inputs = [t.name for t in unet.inputs]
        self.unet_output = unet.outputs[0].name
        self.fields = scheduler_fields(self.spec)
        torch.set_num_threads(1)  # the loop's own math is tiny; leave the cores to the networks
        self.log.info("ready", instance=args.get("model_instance_name"))

    def settings(self, request) -> Txt2ImgRequest:
        """Every scheduler field, defaulted from the spec when absent and checked against its limits."""
        values = {name: scalar(request, name) for name in self.fields}
        settings = validate(Txt2ImgRequest(prompt="", **values), self.spec)
        return resolve_seeds(settings)

    def unet_for(self, request):
        def unet(sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            if request.is_cancelled():
                raise Cancelled()
            arrays = (sample.numpy(), timestep.numpy().reshape(-1, 1), context.numpy())
            inputs = [pb_utils.Tensor(name, array) for name, array in zip(self.unet_inputs, arrays)]
            response = pb_utils.InferenceRequest(
                model_name="unet", requested_output_names=[self.unet_output], inputs=inputs
            ).exec()
            if response.has_error():
                raise RuntimeError(f"unet: {response.error().message()}")
            return torch.from_numpy(pb_utils.get_output_tensor_by_name(response, self.unet_output).as_numpy().copy())

        return unet

    def run(self, request) -> "pb_utils.InferenceResponse":
        start = time.perf_counter()
        settings = self.settings(request)
        embeddings = pb_utils.get_input_tensor_by_name(request, EMBEDDINGS).as_numpy()
        weights = pb_utils.get_input_tensor_by_name(request, TOKEN_WEIGHTS).as_numpy()
        uncond, cond = torch.from_numpy(apply_weights(embeddings, weights)).split(1)
        latents, seeds = txt2img_latents(self.spec, settings, uncond, cond, self.unet_for(request))
        self.log.info("sampled", request_id=request.request_id(), sampler=settings.sampler, steps=settings.steps,
                      size=f"{settings.width}x{settings.height}", images=settings.batch_size, seed=settings.seed,
                      ms=round(1000 * (time.perf_counter() - start), 1))
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(DECODER_LATENTS, latents.numpy()),
            pb_utils.Tensor(SEEDS, torch.tensor(seeds, dtype=torch.int64).numpy()),
        ])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self.run(request))
            except InvalidRequest as exc:
                self.log.info("invalid_request", field=exc.field, value=exc.value)
                responses.append(error_response(str(exc), "INVALID_ARG"))
            except Cancelled:
                self.log.info("cancelled", request_id=request.request_id())
                responses.append(error_response("request cancelled by the client", "CANCELLED"))
            except Exception as exc:  # never let one request take the model down
                self.log.error("failed", error=repr(exc))
                responses.append(error_response(f"scheduler: {exc}"))
        return responses
