"""Single-file checkpoints as users have them (the original LDM / A1111 layout, fp32 and fp16, SD 1.x and 2.x),
exported offline with no config folder: the architecture comes from the weights, the images from diffusers."""

from __future__ import annotations

import hashlib
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff
from sdtrt.contract.errors import UsageError
from sdtrt.requests.request import Txt2ImgRequest

REQUEST = dict(prompt="a castle on a hill", negative_prompt="fog", sampler="Euler a", steps=6, seed=3, width=64,
               height=64)


def export(path, out, **kwargs):
    from sdtrt.export import export_model

    lines: list[str] = []
    spec = export_model(path, out, progress=False, report=lines.append, **kwargs)
    return spec, lines


def images(repo, **overrides):
    from sdtrt.pipeline.local import LocalPipeline

    return LocalPipeline(repo).txt2img(Txt2ImgRequest(**{**REQUEST, **overrides}))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ldm_files(default_model, tmp_path_factory):
    """The default model in the original single-file layout, written by sdtrt's own converter."""
    from sdtrt.export.networks.ldm import to_single_file

    folder = tmp_path_factory.mktemp("single")
    return {dtype: to_single_file(default_model, folder / f"tiny-{dtype}.safetensors", dtype=dtype)
            for dtype in ("float32", "float16")}


def test_a_single_file_exports_offline_and_gives_the_folders_pictures(ldm_files, local_pipeline, tmp_path):
    path = ldm_files["float32"]
    spec, lines = export(path, tmp_path / "repo")
    assert "tiny-float32.safetensors: SD 1.x, epsilon, 512x512 native (read from its weights)" in lines
    assert spec.model_name == "tiny-float32" and spec.source_hash == sha256(path)  # A1111: the file's sha256
    ours = images(tmp_path / "repo")
    assert max_diff(ours.images, local_pipeline.txt2img(Txt2ImgRequest(**REQUEST)).images) == 0  # the same weights
    assert f"Model hash: {sha256(path)[:10]}, Model: tiny-float32," in ours.infotexts[0]


def test_an_fp16_file_matches_diffusers_reading_the_same_file(ldm_files, default_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = ldm_files["float16"]
    export(path, tmp_path / "repo")
    # The reference: diffusers' own single-file loader, given the original folder's configs (not sdtrt's inference).
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(default_model), local_files_only=True,
                                                    safety_checker=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = diffusers_images(pipe, prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"],
                                sampler="Euler a", steps=6, cfg=7.0, seed=3, width=64, height=64)
    assert max_diff(images(tmp_path / "repo").images, expected) <= MAX_PIXEL_DIFF


@pytest.mark.slow  # another single-file export
def test_extra_keys_and_ema_weights_load_as_diffusers_reads_them(ldm_files, tmp_path):
    """Files with EMA copies (model_ema.*, A1111 and diffusers use the plain weights) and leftover keys load."""
    state = load_file(str(ldm_files["float32"]))
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    extra = {"model_ema." + k[len("model."):].replace(".", ""): torch.randn_like(state[k]) for k in unet}
    extra |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    path = tmp_path / "with-ema.safetensors"
    save_file({**state, **extra}, str(path))
    plain, _ = export(ldm_files["float32"], tmp_path / "plain")
    spec, _ = export(path, tmp_path / "ema")
    assert max_diff(images(tmp_path / "ema").images, images(tmp_path / "plain").images) == 0


@pytest.fixture(scope="module")
def sd2_model(tmp_path_factory):
    from sdtrt.pipeline.default_model import build_default_model

    return build_default_model(tmp_path_factory.mktemp("sd2") / "tiny-sd2", family="sd2")


@pytest.mark.slow  # two SD 2 exports
def test_sd2_v_prediction_file_and_folder_match_diffusers(sd2_model, tmp_path):
    """SD 2.x 768-v, as A1111 runs it: OpenCLIP text (penultimate layer), v-prediction; the folder export and the
    single file's give diffusers' picture. A1111 pads OpenCLIP's chunks after their end-of-text with id 0 ("!"),
    as diffusers' SD 2.x tokenizer pads: the reference runs as it comes."""
    from diffusers import StableDiffusionPipeline

    from sdtrt.export.networks.ldm import to_single_file

    path = to_single_file(sd2_model, tmp_path / "tiny-sd2-v.safetensors", open_clip=True)
    spec, lines = export(path, tmp_path / "file", prediction_type="v_prediction")
    assert "tiny-sd2-v.safetensors: SD 2.x, v_prediction, 768x768 native (read from its weights)" in lines
    assert spec.prediction_type == "v_prediction" and spec.field("width").default == 768
    folder, _ = export(sd2_model, tmp_path / "folder")
    assert folder.prediction_type == "v_prediction"
    pipe = StableDiffusionPipeline.from_pretrained(str(sd2_model), local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.pad_token == "!"
    for sampler in ("Euler a", "DPM++ 2M Karras"):
        expected = diffusers_images(pipe, prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"],
                                    sampler=sampler, steps=6, cfg=7.0, seed=3, width=64, height=64)
        for repo in (tmp_path / "file", tmp_path / "folder"):
            assert max_diff(images(repo, sampler=sampler).images, expected) <= MAX_PIXEL_DIFF, (sampler, repo.name)


def test_files_sdtrt_cannot_use_are_refused_naming_the_file_and_the_problem(ldm_files, tmp_path):
    refiner = tmp_path / "refiner-ish.safetensors"
    save_file({"conditioner.embedders.0.model.token_embedding.weight": torch.zeros(8, 4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(refiner))
    lora_like = tmp_path / "not-a-model.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.tensor(4.0)}, str(lora_like))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ldm_files["float32"].read_bytes()[:100_000])
    pickled = tmp_path / "model.ckpt"  # tensors only: read weights-only, then found to be no model
    torch.save({"state_dict": {"x": torch.zeros(1)}}, str(pickled))
    needs_pickle = tmp_path / "trainer.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callbacks": [TrainerState()]}, str(needs_pickle))
    not_torch = tmp_path / "noise.ckpt"
    not_torch.write_bytes(bytes(range(256)) * 40)
    cases = [(refiner, "refiner-ish.safetensors is an SDXL refiner: sdtrt does not serve A1111's Refiner"),
             (lora_like, "not-a-model.safetensors is not a Stable Diffusion checkpoint: it has no U-Net"),
             (truncated, "truncated.safetensors: not a readable .safetensors file"),
             (pickled, "model.ckpt is not a Stable Diffusion checkpoint: it has no U-Net"),
             (needs_pickle, f"trainer.ckpt needs pickle to load: it holds objects of {__name__}.TrainerState"),
             (not_torch, "noise.ckpt")]
    existing = tmp_path / "existing"
    spec, _ = export(ldm_files["float32"], existing)
    before = {p.relative_to(existing): p.stat().st_mtime_ns for p in existing.rglob("*")}
    for path, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            export(path, tmp_path / "new")
        with pytest.raises(UsageError, match=re.escape(message)):
            export(path, existing)
        assert not (tmp_path / "new").exists()
        assert {p.relative_to(existing): p.stat().st_mtime_ns for p in existing.rglob("*")} == before


class TrainerState:
    """What a training framework leaves in a .ckpt beside the weights (pytorch_lightning's callbacks, say): an
    object of a class, which only a full unpickling can rebuild."""

    def __init__(self):
        self.epoch = 3


class WritesAFile:
    """An object whose unpickling runs code: it opens (creates) a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def pickle_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "pickle" in str(w.message)]


def test_a_ckpt_of_tensors_loads_without_allow_pickle_and_without_a_warning(ldm_files, local_pipeline, tmp_path,
                                                                            recwarn):
    """A plain state dict loads with torch's weights_only=True: tensors, numbers and strings, nothing that runs."""
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(ldm_files["float32"])), "epoch": 3, "global_step": 10}, str(path))
    spec, _ = export(path, tmp_path / "repo")
    assert not pickle_warnings(recwarn)
    assert spec.model_name == "tiny" and spec.model_hash == sha256(path)[:10]
    assert max_diff(images(tmp_path / "repo").images, local_pipeline.txt2img(Txt2ImgRequest(**REQUEST)).images) == 0


def test_a_ckpt_that_needs_pickle_is_refused_naming_its_class_and_loads_when_trusted(ldm_files, local_pipeline,
                                                                                    tmp_path):
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": load_file(str(ldm_files["float32"])), "callbacks": {"state": TrainerState()}},
               str(path))
    with pytest.raises(UsageError) as refused:
        export(path, tmp_path / "refused")
    assert f"{__name__}.TrainerState" in str(refused.value) and "--allow-pickle" in str(refused.value)
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning, match=rf"trained.ckpt with pickle, for objects of {__name__}.TrainerState: "
                                         "it can run code"):
        spec, _ = export(path, tmp_path / "repo", allow_pickle=True)
    assert spec.model_name == "trained" and spec.model_hash == sha256(path)[:10]  # the file's own hash
    assert max_diff(images(tmp_path / "repo").images, local_pipeline.txt2img(Txt2ImgRequest(**REQUEST)).images) == 0


def test_a_refused_ckpt_runs_none_of_its_code(tmp_path):
    marker = tmp_path / "written-by-the-pickle"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": WritesAFile(marker)}, str(path))
    assert not marker.exists()
    with pytest.raises(UsageError, match=r"evil.ckpt needs pickle to load: it holds objects of .*open.*--allow-pickle"):
        export(path, tmp_path / "repo")
    assert not marker.exists() and not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_an_sd15_shaped_single_file_exports_without_config(tmp_path):
    """Full size, random weights (v1-5-pruned's shapes: fp16, 2 GB): the export a user runs on their own file."""
    from sdtrt.pipeline.default_model import build_default_model
    from sdtrt.export.networks.ldm import to_single_file

    folder = build_default_model(tmp_path / "sd15", size="sd15")
    path = to_single_file(folder, tmp_path / "v1-5-pruned-shaped.safetensors", dtype="float16")
    shutil.rmtree(folder)
    spec, lines = export(path, tmp_path / "repo", min_size=64, max_size=512)
    assert "v1-5-pruned-shaped.safetensors: SD 1.x, epsilon, 512x512 native (read from its weights)" in lines
    assert spec.text_hidden_size == 768 and spec.component("unet").input("sample").shape[1] == 4
    result = images(tmp_path / "repo", steps=2)
    assert result.images.shape == (1, 64, 64, 3) and np.isfinite(result.images).all()


@pytest.fixture(scope="module")
def other_vae(default_model, tmp_path_factory):
    """Another VAE of the same architecture (other weights), as a civitai-style file in the original layout (no
    prefix, like vae-ft-mse-840000-ema-pruned) and in diffusers' layout."""
    from diffusers import AutoencoderKL

    from sdtrt.export.networks.ldm import VAE, vae_to_ldm

    folder = tmp_path_factory.mktemp("vae")
    base = AutoencoderKL.from_pretrained(str(default_model / "vae"), local_files_only=True)
    torch.manual_seed(99)
    vae = AutoencoderKL.from_config(base.config).eval()
    ldm = {k[len(VAE):]: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), dict(vae.config)).items()}
    save_file(ldm, str(folder / "other-vae.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "other-vae-diffusers.safetensors"))
    return vae, folder


@pytest.mark.slow  # another single-file export
def test_a_vae_file_replaces_the_checkpoints_and_is_named_in_the_infotext(default_model, other_vae, tmp_path):
    from diffusers import StableDiffusionPipeline

    vae, folder = other_vae
    path = folder / "other-vae.safetensors"
    spec, lines = export(default_model, tmp_path / "repo", vae=path)
    assert "VAE: other-vae.safetensors in place of the checkpoint's" in lines
    ours = images(tmp_path / "repo")
    assert f"Model: default, VAE hash: {sha256(path)[:10]}, VAE: other-vae.safetensors," in ours.infotexts[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True, safety_checker=None)
    pipe.vae = vae
    pipe.set_progress_bar_config(disable=True)
    expected = diffusers_images(pipe, prompt=REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"],
                                sampler="Euler a", steps=6, cfg=7.0, seed=3, width=64, height=64)
    assert max_diff(ours.images, expected) <= MAX_PIXEL_DIFF
    export(default_model, tmp_path / "diffusers-layout", vae=folder / "other-vae-diffusers.safetensors")
    assert max_diff(images(tmp_path / "diffusers-layout").images, ours.images) == 0


def test_a_vae_of_another_architecture_is_refused(default_model, tmp_path):
    wrong = tmp_path / "wrong-vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(8, 3, 3, 3)}, str(wrong))
    with pytest.raises(UsageError, match="wrong-vae.safetensors does not fit this checkpoint's VAE"):
        export(default_model, tmp_path / "repo", vae=wrong)
    assert not (tmp_path / "repo").exists()
