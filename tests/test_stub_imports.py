"""What each served model's stub imports when Triton starts it.

Every Python model is its own process and all of them start at once, so their imports are a server's start time
(and a healed model's): on 2 cores, eight stubs that each imported torch and diffusers' pipelines took ~50 s to be
ready and ~480 MB each; without them, ~14 s. The progress, tokenizer and network models need neither; the job
models need torch and the schedulers, not diffusers' pipeline modules (transformers, scipy).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LIGHT = ["progress_model", "network_model", "tokenizer_model", "triton_io"]
JOBS = ["txt2img_model", "img2img_model"]
WATCHED = ["torch", "diffusers", "diffusers.pipelines", "scipy"]


def loaded_after_import(module: str, tmp_path) -> set[str]:
    """The watched modules loaded once ``sdtrt.model_repository.models.<module>`` is imported in a fresh
    interpreter, with a stand-in for the module only Triton's stub provides (nothing is called at import)."""
    (tmp_path / "triton_python_backend_utils.py").write_text("")
    code = (f"import sys, json; import sdtrt.model_repository.models.{module}; "
            f"print(json.dumps([m for m in {WATCHED!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", LIGHT)
def test_light_stubs_import_neither_torch_nor_diffusers(module, tmp_path):
    assert loaded_after_import(module, tmp_path) == set()


@pytest.mark.parametrize("module", JOBS)
def test_job_stubs_import_torch_but_not_diffusers_pipelines(module, tmp_path):
    loaded = loaded_after_import(module, tmp_path)
    assert "torch" in loaded  # the check sees a heavy import when there is one
    assert "diffusers.pipelines" not in loaded and "scipy" not in loaded, loaded
