"""The layers of sdtrt and the way imports go (docs/code-layout.md), checked on the source.

Each module belongs to one layer; it may import its own layer and the layers below, never above. The client
layer is thinner still: the contract and tritonclient, nothing else of sdtrt. The contract and the client import
no heavy library (torch, diffusers, transformers, onnxruntime, ...) when they are imported: a client-only install
does not have them (tests/test_client_install.py proves it by installing one).
"""

from __future__ import annotations

import ast
import functools
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each folder is one layer, lowest first; folders of equal rank sit side by side and may not import each other.
# pyproject.toml's package-dir is the one place folders map to modules: it is read here, not repeated.
LAYERS: dict[str, tuple[int, str]] = {
    "sdtrt": (0, "the package root: its version; __main__ runs the CLI (checked as the applications)"),
    "sdtrt/contract": (0, "the spec, errors, samplers, seeds, files, images: what every layer reads"),
    "sdtrt/requests": (1, "a request's fields and validation, A1111's prompt syntax, styles, infotext"),
    "sdtrt/postprocessing": (2, "a finished picture: upscaler models tiled, Extras' sizes, faces restored"),
    "sdtrt/pipeline": (3, "conditioning, the denoising loop, jobs, VAE, runners, the in-process runner"),
    "model_repository": (4, "the repository generator: config.pbtxt, perf inputs, probes from the spec"),
    "export/networks": (4, "a network as ONNX sees it: checkpoints read, LoRA slots, descriptors, the ONNX export"),
    "export": (5, "checkpoint -> ONNX -> engines, and the spec"),
    "model_repository/models": (5, "the Triton models the generated repository loads"),
    "client": (6, "the client library over tritonclient"),
    "model_repository/serving": (6, "tritonserver's launcher, watchdog and healer"),
    "client/apps": (7, "the sdtrt command, the A1111 gateway, the page"),
}
THIN = {"sdtrt/contract", "sdtrt/requests", "sdtrt/postprocessing", "client"}  # importable where only the client install is
MAX_MODULES = 15
HEAVY = {"torch", "diffusers", "transformers", "onnxruntime", "openvino", "onnx", "onnxscript", "tensorrt", "polygraphy", "peft",
         "accelerate", "safetensors", "triton_python_backend_utils"}


def package_dirs() -> dict[str, str]:
    """pyproject.toml's package-dir: package -> folder."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def module_name(path: Path) -> str:
    """The module a source file is installed as, by the longest package-dir folder that holds it."""
    relative = path.relative_to(ROOT)
    package, folder = max(((p, f) for p, f in package_dirs().items() if relative.is_relative_to(f)),
                          key=lambda item: len(item[1]))
    parts = relative.relative_to(folder).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join((package, *parts))


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for folder in package_dirs().values():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[module_name(path)] = path
    return found


def layer_of(module: str) -> str:
    if module == "sdtrt.__main__":
        return "client/apps"
    folder = modules()[module].parent.relative_to(ROOT).as_posix()
    assert folder in LAYERS, f"{module} is in folder {folder}/, which is no layer: add it to LAYERS here and to docs/code-layout.md"
    return folder


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


def check_imports(module: str, path: Path, name: str) -> None:
    """Every import of ``module`` (its source at ``path``, in layer ``name``) goes to its own layer or below."""
    known = modules()
    rank, _ = LAYERS[name]
    for target, at_import_time in imports(path):
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
            assert other in THIN, f"{module} (client) imports {target} ({other}): the client needs the contract only"


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_go_downwards(module):
    check_imports(module, modules()[module], layer_of(module))


def test_no_folder_holds_more_than_15_modules():
    for folder in LAYERS:
        count = len(list((ROOT / folder).glob("*.py")))
        assert count <= MAX_MODULES, f"{folder}/ holds {count} modules: split it into layers"


def test_every_layer_folder_is_installed_as_a_package():
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for folder in LAYERS:
        assert module_name(ROOT / folder / "__init__.py") in packages, folder


def test_the_layer_rule_fails_on_an_upward_import(tmp_path):
    """The rule is not vacuous: the contract importing the pipeline, or the client the serving layer beside it, is refused."""
    upward = tmp_path / "spec.py"
    upward.write_text(modules()["sdtrt.contract.spec"].read_text() + "\nfrom sdtrt.pipeline.jobs import encode_prompts\n")
    with pytest.raises(AssertionError, match="layers import only downwards"):
        check_imports("sdtrt.contract.spec", upward, "sdtrt/contract")
    sideways = tmp_path / "client.py"
    sideways.write_text(modules()["sdtrt.client.client"].read_text() + "\nimport sdtrt.model_repository.serving.health\n")
    with pytest.raises(AssertionError, match="layers import only downwards"):
        check_imports("sdtrt.client.client", sideways, "client")
