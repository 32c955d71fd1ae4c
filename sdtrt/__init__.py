"""sdtrt: Stable Diffusion served the way production inference is served.

Pipeline, as laid out in the source tree: ``export/`` (checkpoint -> ONNX -> TensorRT) ->
``model_repository/`` (the Triton models) -> ``client/`` (gRPC/HTTP clients, CLI).
This folder holds what all three share, one layer a folder: ``contract/`` (the model spec, samplers, seeds),
``requests/`` (request fields, A1111's prompt syntax) and ``pipeline/`` (the denoising loop, the jobs); see
docs/code-layout.md.
"""

__version__ = "0.1.0"
