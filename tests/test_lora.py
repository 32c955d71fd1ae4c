"""LoRAs fused at export: the exported networks give diffusers' image with the same LoRA loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loras import make_lora, to_kohya
from reference import MAX_PIXEL_DIFF, max_diff, reference_scheduler
from sdtrt.requests.request import Txt2ImgRequest


@pytest.fixture(scope="module")
def lora_file(default_model, tmp_path_factory):
    """A LoRA on the U-Net's attention projections, made with peft and saved as diffusers saves LoRAs."""
    return make_lora(default_model, tmp_path_factory.mktemp("lora"))


def test_fused_lora_export_matches_diffusers_with_the_lora(default_model, lora_file, local_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdtrt.export import export_model
    from sdtrt.pipeline.local import LocalPipeline

    spec = export_model(default_model, tmp_path / "repo", loras=(f"{lora_file}:0.8",), progress=False,
                        report=lambda *_: None)
    assert spec.model_name == "default" and spec.source_hash != local_pipeline.spec.source_hash
    assert [(lora["name"], lora["scale"]) for lora in spec.extra["loras"]] == [("lora7", 0.8)]
    request = Txt2ImgRequest(prompt="a castle", sampler="Euler", steps=6, seed=3, width=64, height=64)
    with_lora = LocalPipeline(tmp_path / "repo").txt2img(request)

    pipe = StableDiffusionPipeline.from_pretrained(str(default_model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=0.8)
    pipe.scheduler = reference_scheduler("Euler", pipe.scheduler.config, 3)
    expected = pipe("a castle", num_inference_steps=6, guidance_scale=7.0, width=64, height=64, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(3)).images
    assert max_diff(with_lora.images, (expected * 255).round().astype(np.uint8)) <= MAX_PIXEL_DIFF
    assert max_diff(with_lora.images, local_pipeline.txt2img(request).images) > MAX_PIXEL_DIFF
    lora_hash = spec.extra["loras"][0]["sha256"][:12]
    assert f'Model hash: {spec.model_hash}, Model: default, RNG: CPU, Lora hashes: "lora7: {lora_hash}"' in \
        with_lora.infotexts[0]


def test_missing_lora_file_is_named(capsys, default_model, tmp_path):
    from sdtrt.client.apps.cli import main

    code = main(["export", str(default_model), "--out", str(tmp_path / "r"), "--lora", str(tmp_path / "nope.safetensors")])
    assert code == 2 and "nope.safetensors: no such file" in capsys.readouterr().err


def test_lora_fused_export_has_the_plain_exports_weight_names(default_model, lora_file, exported_repo, tmp_path):
    """Refit swaps weights into a TensorRT engine by ONNX initializer name, so a LoRA-fused export must have
    exactly the plain export's initializers (names, shapes, dtypes), with some of their values changed."""
    import onnx
    from onnx import numpy_helper

    from sdtrt.export import export_model

    export_model(default_model, tmp_path / "lora", loras=(f"{lora_file}:0.8",), progress=False, report=lambda *_: None)
    for name in ("unet", "text_encoder", "vae_decoder", "vae_encoder"):
        plain = onnx.load(str(exported_repo / f"default__{name}" / "1" / "model.onnx")).graph.initializer
        fused = onnx.load(str(tmp_path / "lora" / f"default__{name}" / "1" / "model.onnx")).graph.initializer
        signature = lambda inits: sorted((i.name, tuple(i.dims), i.data_type) for i in inits)  # noqa: E731
        assert signature(fused) == signature(plain), name
        if name == "unet":  # the LoRA is on the U-Net's attention: those weights, and only the U-Net's, changed
            before = {i.name: numpy_helper.to_array(i) for i in plain}
            changed = [i.name for i in fused if not np.array_equal(numpy_helper.to_array(i), before[i.name])]
            assert changed, "the fused LoRA changed no U-Net weight"


class TrainerState:
    """What a trainer may leave in a .pt beside the tensors: an object only a full unpickling rebuilds."""

    def __init__(self):
        self.step = 100


def test_a_pickled_lora_of_tensors_fuses_without_allow_pickle_and_one_that_needs_pickle_only_when_trusted(
        default_model, lora_file, tmp_path):
    from safetensors.torch import load_file

    from sdtrt.contract.errors import UsageError
    from sdtrt.export.networks.checkpoint import fuse_loras, load_checkpoint

    kohya = to_kohya(lora_file, tmp_path / "kohya", alpha=2.0)  # its alpha in its tensors, as .pt LoRAs have it
    tensors = load_file(str(kohya))
    plain, trained = tmp_path / "plain.pt", tmp_path / "trained.pt"
    torch.save(tensors, str(plain))
    torch.save({**tensors, "trainer": TrainerState()}, str(trained))

    def fused(path, **kwargs):
        ckpt = fuse_loras(load_checkpoint(default_model, report=lambda *_: None), [(path, 0.8)], **kwargs)
        return {k: v.clone() for k, v in ckpt.pipe.unet.state_dict().items()}

    expected = fused(kohya)
    base = load_checkpoint(default_model, report=lambda *_: None).pipe.unet.state_dict()
    assert not all(torch.equal(v, base[k]) for k, v in expected.items())  # the LoRA changed the weights
    assert all(torch.equal(v, expected[k]) for k, v in fused(plain).items())
    with pytest.raises(UsageError, match=rf"trained.pt needs pickle to load: it holds objects of "
                                         rf"{__name__}.TrainerState.*--allow-pickle"):
        fused(trained)
    with pytest.warns(UserWarning, match=rf"trained.pt with pickle, for objects of {__name__}.TrainerState"):
        assert all(torch.equal(v, expected[k]) for k, v in fused(trained, allow_pickle=True).items())


def test_a_pickled_embedding_reads_weights_only_unless_trusted(tmp_path):
    from sdtrt.contract.errors import UsageError
    from sdtrt.export.networks.lora import read_embedding, register_embeddings

    vectors = torch.randn(2, 32)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": vectors}, "name": "plain", "step": 10}, str(folder / "plain.pt"))
    assert torch.equal(read_embedding(folder / "plain.pt"), vectors)
    registry = register_embeddings(folder, 32, tmp_path / "out", allow_pickle=False, report=lambda *_: None)
    assert list(registry) == ["plain"]
    torch.save({"string_to_param": {"*": vectors}, "trainer": TrainerState()}, str(folder / "trained.pt"))
    with pytest.raises(UsageError, match=rf"trained.pt needs pickle to load: it holds objects of "
                                         rf"{__name__}.TrainerState"):
        register_embeddings(folder, 32, tmp_path / "refused", allow_pickle=False, report=lambda *_: None)
    assert not (tmp_path / "refused").exists()  # refused before any file was registered
    with pytest.warns(UserWarning, match="trained.pt with pickle"):
        assert torch.equal(read_embedding(folder / "trained.pt", allow_pickle=True), vectors)
