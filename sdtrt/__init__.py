"""sdtrt: Stable Diffusion served the way production inference is served.

Pipeline, as laid out in the source tree: ``export/`` (checkpoint -> ONNX -> TensorRT) ->
``model_repository/`` (the Triton models) -> ``client/`` (gRPC/HTTP clients, CLI).
This package holds what all three share: the model spec, the request fields, the sampler table,
the seed contract and the denoising loop.
"""

__version__ = "0.1.0"
