"""The sdtrt command line: help, the PNG it writes, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from sdtrt.client.apps.cli import main
from sdtrt.requests.infotext import parse_infotext


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "sdtrt", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("init-default", "export", "txt2img", "samplers"):
        assert command in result.stdout


def test_txt2img_help_documents_every_field_with_the_models_own_range_and_default(exported_repo, server):
    """The ranges and defaults are the model's (its spec), read from the export (--local) or the server (--url)."""
    plain = subprocess.run([sys.executable, "-m", "sdtrt", "txt2img", "--help"], capture_output=True, text=True)
    text = " ".join(plain.stdout.split())
    assert "add --url URL or --local DIR to --help" in text and "from 1 to 150" not in text  # no made-up ranges
    assert "--cfg-scale" in text and "--negative-prompt" in text and "--batch-size" in text
    for where in (["--local", str(exported_repo)], ["--url", server.url]):
        served = subprocess.run([sys.executable, "-m", "sdtrt", "txt2img", *where, "--help"], capture_output=True,
                                text=True)
        text = " ".join(served.stdout.split())
        assert "the ranges and defaults of default [" in text, where
        assert "sampling steps; an integer, from 1 to 150 (default: 20)" in text
        assert "image width in pixels; an integer, a multiple of 8, from 64 to 1024 (default: 512)" in text
        assert "what to draw" not in served.stderr and "transformers" not in served.stderr


def test_txt2img_writes_numbered_pngs_with_infotext(capsys, exported_repo, tmp_path):
    args = ["txt2img", "a red fox", "--negative-prompt", "blurry, dark", "--steps", "5", "--sampler", "DPM++ 2M Karras",
            "--cfg-scale", "6.5", "--seed", "42", "--width", "64", "--height", "96", "--batch-size", "2",
            "--local", str(exported_repo), "--out", str(tmp_path)]
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001-42.png", "00002-43.png"]
    with Image.open(tmp_path / "00002-43.png") as im:
        assert im.size == (64, 96)
        prompt, negative, params = parse_infotext(im.info["parameters"])
    assert (prompt, negative) == ("a red fox", "blurry, dark")
    assert params["Steps"] == "5" and params["Sampler"] == "DPM++ 2M Karras" and params["CFG scale"] == "6.5"
    assert params["Seed"] == "43" and params["Size"] == "64x96" and params["Model"] == "default"
    assert len(params["Model hash"]) == 10
    code, _, _ = run(capsys, *args)  # a second run never overwrites
    assert code == 0 and len(list(tmp_path.iterdir())) == 4


@pytest.mark.parametrize(
    "flags,field,allowed",
    [
        (["--width", "500"], "width", "an integer, a multiple of 8, from 64 to 1024"),
        (["--height", "2048"], "height", "an integer, a multiple of 8, from 64 to 1024"),
        (["--steps", "0"], "steps", "from 1 to 150"),
        (["--batch-size", "9"], "batch_size", "from 1 to 4"),
        (["--cfg-scale", "-1"], "guidance_scale", "a number, from 0 to 30"),
    ],
)
def test_bad_settings_name_the_field_and_range(capsys, exported_repo, tmp_path, flags, field, allowed):
    code, _, err = run(capsys, "txt2img", "x", "--local", str(exported_repo), "--out", str(tmp_path), *flags)
    assert code == 2
    assert f"invalid {field}=" in err and allowed in err
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_unknown_sampler_lists_valid_ones(capsys, exported_repo):
    with pytest.raises(SystemExit) as exc:
        main(["txt2img", "x", "--local", str(exported_repo), "--sampler", "Euler b"])
    assert exc.value.code == 2
    assert "DPM++ 2M Karras" in capsys.readouterr().err


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = run(capsys, "export", str(tmp_path / "nope"), "--out", str(tmp_path / "repo"))
    assert code == 2 and "MODEL_DIR" in err and "does not exist" in err


def test_non_diffusers_folder(capsys, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    code, _, err = run(capsys, "export", str(tmp_path / "junk"), "--out", str(tmp_path / "repo"))
    assert code == 2 and "not a diffusers folder" in err and "model_index.json" in err


def test_empty_repo_dir(capsys, tmp_path):
    code, _, err = run(capsys, "txt2img", "x", "--local", str(tmp_path))
    assert code == 2 and "REPO_DIR" in err and "sdtrt export" in err


def test_samplers_lists_the_table(capsys):
    code, out, _ = run(capsys, "samplers")
    assert code == 0
    assert "Euler a" in out and "EulerAncestralDiscreteScheduler" in out
    table, k_note, schedules = out.split("\n\n")
    rows = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert rows["DPM++ 2M Karras"][-6:] == ["DPMSolverMultistepScheduler", "use_karras_sigmas=True",
                                           "timestep_spacing=linspace", "|", "k-diffusion", "sample_dpmpp_2m"]
    assert rows["DPM++ SDE"][-8:-3] == ["DPMSolverSDEScheduler", "use_karras_sigmas=True", "timestep_spacing=linspace",
                                        "(Automatic:", "Karras)"]
    assert rows["Euler"][-4:] == ["EulerDiscreteScheduler", "|", "k-diffusion", "sample_euler"]
    assert rows["DPM++ 3M SDE"][-7:] == ["(k-diffusion", "only)", "(Automatic:", "Exponential)", "|", "k-diffusion",
                                         "sample_dpmpp_3m_sde"]
    assert rows["DDIM"][-8:] == ["DDIMScheduler", "clip_sample=False", "set_alpha_to_one=False", "|", "A1111's", "own",
                                 "timesteps:", "ddim"]
    assert rows["DDIM CFG++"][-7:] == ["own", "only)", "|", "A1111's", "own", "timesteps:", "ddim_cfgpp"]
    assert len(rows) == 29
    assert "--k-diffusion" in k_note
    assert "SGM Uniform      timestep_spacing=trailing; with 27 of 29 samplers" in schedules
    assert "Align Your Steps A1111's sigma list, given to diffusers as custom sigmas; with 24 of 29" in schedules


def test_a_sampler_sdtrt_does_not_know_is_refused_naming_the_ones_it_has(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        run(capsys, "txt2img", "x", "--sampler", "DDIM CFG+", "--local", str(tmp_path))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'DDIM CFG+'" in err and "'DDIM CFG++'" in err
