"""The pipeline in PyTorch/numpy: conditioning, the denoising loop, the jobs, the VAE, the network runners
(onnxruntime, OpenVINO, TensorRT), the in-process runner and the default model."""
