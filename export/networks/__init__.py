"""A network as ONNX sees it, below the export that assembles a model from them: checkpoints and single files read
(checkpoint.py, single_file.py, ldm.py), LoRA slots (lora.py), each network's descriptor (descriptors.py) and the
ONNX export with its checks (onnx_export.py)."""
