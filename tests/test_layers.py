"""The layers of sdtrt and the way imports go (README, "How the code is laid out"), checked on the source.

Each module belongs to one layer; it may import its own layer and the layers below, never above. The client
layer is thinner still: the contract and tritonclient, nothing else of sdtrt. The contract and the client import
no heavy library (torch, diffusers, transformers, onnxruntime, ...) when they are imported: a client-only install
does not have them (tests/test_client_install.py proves it by installing one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"sdtrt": "sdtrt", "export": "sdtrt.export", "model_repository": "sdtrt.model_repository",
           "client": "sdtrt.client", "app": "sdtrt.app"}

# Lowest first. Layers of equal rank are side by side and may not import each other.
LAYERS: dict[str, tuple[int, set[str]]] = {
    "contract": (0, {"sdtrt", "sdtrt.errors", "sdtrt.spec", "sdtrt.request", "sdtrt.samplers", "sdtrt.schedules", "sdtrt.seeds",
                     "sdtrt.infotext", "sdtrt.generation", "sdtrt.images", "sdtrt.outputs", "sdtrt.hires",
                     "sdtrt.img2img", "sdtrt.prompts", "sdtrt.architectures", "sdtrt.extra_networks", "sdtrt.previews",
                     "sdtrt.styles", "sdtrt.upscale", "sdtrt.prompt_schedule", "sdtrt.scenes",
                     "sdtrt.philox", "sdtrt.prometheus", "sdtrt.pictures", "sdtrt.files"}),
    "pipeline": (1, {"sdtrt.denoise", "sdtrt.vae", "sdtrt.jobs", "sdtrt.text", "sdtrt.local", "sdtrt.clip_vocab",
                     "sdtrt.conditioning",
                     "sdtrt.default_model", "sdtrt.engines", "sdtrt.runners"}),
    "repository generator": (2, {"sdtrt.model_repository", "sdtrt.model_repository.configs",
                                 "sdtrt.model_repository.build", "sdtrt.model_repository.perf",
                                 "sdtrt.model_repository.probes"}),
    "export": (3, {"sdtrt.export", "sdtrt.export.checkpoint", "sdtrt.export.descriptors", "sdtrt.export.lora",
                   "sdtrt.export.onnx_export", "sdtrt.export.tensorrt", "sdtrt.export.single_file", "sdtrt.export.ldm",
                   "sdtrt.export.latent_preview"}),
    "served models": (3, {"sdtrt.model_repository.triton_io", "sdtrt.model_repository.bls",
                          "sdtrt.model_repository.metrics", "sdtrt.model_repository.step_batcher",
                          "sdtrt.model_repository.txt2img_model", "sdtrt.model_repository.img2img_model",
                          "sdtrt.model_repository.tokenizer_model", "sdtrt.model_repository.progress_model", "sdtrt.model_repository.network_model",
                          "sdtrt.model_repository.onnx_model"}),
    "client": (4, {"sdtrt.client", "sdtrt.client.client"}),
    "application": (5, {"sdtrt.__main__", "sdtrt.app", "sdtrt.app.cli", "sdtrt.app.server", "sdtrt.app.health",
                        "sdtrt.app.models", "sdtrt.app.control",
                        "sdtrt.app.soak", "sdtrt.client.cli", "sdtrt.client.a1111_api", "sdtrt.client.ui",
                        "sdtrt.client.web_guard"}),
}
THIN = {"contract", "client"}  # importable where only the client install is
HEAVY = {"torch", "diffusers", "transformers", "onnxruntime", "openvino", "onnx", "onnxscript", "tensorrt", "polygraphy", "peft",
         "accelerate", "safetensors", "triton_python_backend_utils"}


def layer_of(module: str) -> str:
    for name, (_, modules) in LAYERS.items():
        if module in modules:
            return name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to the README's table")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at import time?) for every import; TYPE_CHECKING blocks are not imports."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, at_import_time: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, at_import_time) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, at_import_time))
                found.extend((f"{child.module}.{alias.name}", at_import_time) for alias in child.names)
            visit(child, at_import_time and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, True)
    return found


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_go_downwards(module):
    known = modules()
    name = layer_of(module)
    rank, _ = LAYERS[name]
    for target, at_import_time in imports(known[module]):
        if target.split(".")[0] in HEAVY and name in THIN:
            assert not at_import_time, f"{module} ({name}) imports {target} when imported: import it where it is used"
        if target not in known:
            continue  # third-party, or a name imported from a module (checked through its module)
        other = layer_of(target)
        other_rank, _ = LAYERS[other]
        if other == name:
            continue
        assert other_rank < rank, f"{module} ({name}) imports {target} ({other}): layers import only downwards"
        if name == "client":
            assert other == "contract", f"{module} (client) imports {target} ({other}): the client needs the contract only"
