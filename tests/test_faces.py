"""Face restoration (A1111's Restore faces and Extras' GFPGAN / CodeFormer): registered at export, served as
networks, run around them as A1111 runs them.

The files are random-weight ones in the layouts A1111's folders hold: spandrel's GFPGAN (GFPGANv1Clean) and
CodeFormer, facexlib's RetinaFace ResNet-50 and ParseNet. The detector's heads are tuned (scaled, biased) so that a
picture holds a few large faces, each with a face-like set of landmarks; a random detector finds none or hundreds.

The reference is A1111 1.10's restore_with_face_helper (restated below) over facexlib 0.3's own FaceRestoreHelper,
detector and parser modules, with the restorers run in torch as A1111 calls them; torchvision's two functions it
calls (normalize, nms) are restated here, since PyPI's torchvision does not load with a CPU torch."""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import json
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from reference import MAX_PIXEL_DIFF, max_diff, sample_picture
from servers import triton_on
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app
from sdtrt.contract.errors import InvalidRequest, UsageError
from sdtrt.pipeline.local import LocalPipeline
from sdtrt.requests.request import Txt2ImgRequest

# Exporting and serving full-size GFPGAN and CodeFormer (90 M parameters each) takes minutes on 2 cores: those tests
# are slow; the default suite holds the steps around the networks to facexlib with the torch detector and parser.
slow = pytest.mark.slow


# --- the files ------------------------------------------------------------------------------------------------------
def tuned_detector(seed: int = 0) -> torch.nn.Module:
    """facexlib's RetinaFace with random weights, its heads scaled to the features of a sample picture and biased:
    only the coarsest level's 512-pixel anchors can be faces (by a score that varies with the picture), the boxes
    stay near their anchors, and the landmarks sit where eyes, nose and mouth corners would."""
    from sdtrt.export.faces import facexlib_network

    torch.manual_seed(seed)
    net = facexlib_network("detector").eval()
    picture = torch.from_numpy(sample_picture(640, 640)[:, :, ::-1].copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        fpn = net.fpn(list(net.body(picture - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)).values()))
        features = [net.ssh1(fpn[0]), net.ssh2(fpn[1]), net.ssh3(fpn[2])]
        for level, feature in enumerate(features):
            for head, spread in ((net.ClassHead, 2.0), (net.BboxHead, 0.3), (net.LandmarkHead, 0.3)):
                conv = head[level].conv1x1
                conv.weight *= spread / (float(feature.std()) * float(conv.weight.std()) * conv.weight.shape[1] ** 0.5)
                conv.bias.zero_()
            scores = net.ClassHead[level].conv1x1.bias
            scores[1::2] = -6.0
            if level == 2:
                scores[3] = 1.5  # (channel = anchor * 2 + class: anchor 1 is the 512-pixel one)
            net.LandmarkHead[level].conv1x1.bias.view(2, 10)[:] = torch.tensor(
                [-1.5, -1.0, 1.5, -1.0, 0.0, 0.4, -1.2, 2.0, 1.2, 2.0])
    return net


def restorers() -> dict[str, torch.nn.Module]:
    from sdtrt.export.upscalers import spandrel

    spandrel()  # (imports spandrel past its torchvision import)
    from spandrel.architectures.GFPGAN import GFPGAN
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(1)
    codeformer = CodeFormer(connect_list=["32", "64", "128", "256"]).eval()
    with torch.no_grad():  # its code choices (an argmax over 1024) far apart, as trained ones are: ties would flip
        codeformer.idx_pred_layer[1].weight *= 100  # between onnxruntime and torch
    return {"GFPGAN": GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                             fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                             sft_half=True).eval(), "CodeFormer": codeformer}


def _save(module: torch.nn.Module, path) -> None:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def helpers():
    from sdtrt.export.faces import facexlib_network

    torch.manual_seed(2)
    return {"detector": tuned_detector(), "parser": facexlib_network("parser").eval()}


@pytest.fixture(scope="module")
def modules(helpers):
    return {**helpers, **restorers()}


@pytest.fixture(scope="module")
def face_folder(modules, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    names = {"detector": "detection_Resnet50_Final.safetensors", "parser": "parsing_parsenet.safetensors",
             "GFPGAN": "GFPGANv1.4.safetensors", "CodeFormer": "codeformer-v0.1.0.safetensors"}
    for kind, name in names.items():
        _save(modules[kind], folder / name)
    return folder


@pytest.fixture(scope="module")
def repo(export_default, face_folder):
    return export_default("face-repo", face_restorer_dir=face_folder)


@pytest.fixture(scope="module")
def local(repo):
    return LocalPipeline(repo)


# --- the reference: A1111 over facexlib -----------------------------------------------------------------------------
def _normalize(tensor: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    """torchvision's normalize: per channel, (x - mean) / std."""
    tensor = tensor if inplace else tensor.clone()
    return tensor.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's nms: the highest-scoring box, then each one overlapping no kept box by more than the IoU."""
    keep = []
    for i in torch.argsort(scores, descending=True).tolist():
        box = boxes[i]
        ok = True
        for j in keep:
            lo, hi = torch.maximum(box[:2], boxes[j, :2]), torch.minimum(box[2:], boxes[j, 2:])
            inter = float(torch.clamp(hi - lo, min=0).prod())
            union = float((box[2:] - box[:2]).prod() + (boxes[j, 2:] - boxes[j, :2]).prod()) - inter
            ok = ok and inter / union <= iou_threshold
        if ok:
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


@contextlib.contextmanager
def torchvision_functions():
    package = types.ModuleType("torchvision")
    transforms, functional, ops = (types.ModuleType(f"torchvision.{n}") for n in ("transforms", "transforms.functional", "ops"))
    functional.normalize, ops.nms, transforms.functional = _normalize, _nms, functional
    package.transforms, package.ops = transforms, ops
    added = {"torchvision": package, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional,
             "torchvision.ops": ops}
    sys.modules.update(added)
    try:
        yield package
    finally:
        for name in added:
            sys.modules.pop(name, None)


def a1111_restore(picture: np.ndarray, modules: dict, restorer: str, weight: float = 0.5) -> np.ndarray:
    """A1111's restore_with_face_helper (modules/face_restoration_utils.py) with facexlib's FaceRestoreHelper as
    create_face_helper makes it, the restorer called as gfpgan_model / codeformer_model call it."""
    with torchvision_functions() as torchvision:
        helpers = importlib.import_module("facexlib.utils.face_restoration_helper")
        importlib.import_module("facexlib.detection.retinaface_utils").torchvision = torchvision
    helpers.init_detection_model = lambda *_, **__: modules["detector"]  # (instead of its download)
    helpers.init_parsing_model = lambda *_, **__: modules["parser"]
    helper = helpers.FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
                                       det_model="retinaface_resnet50", save_ext="png", use_parse=True,
                                       device=torch.device("cpu"))
    net = modules[restorer]

    def restore_face(face: torch.Tensor) -> torch.Tensor:
        if restorer not in ("CodeFormer", "GFPGAN"):
            return net(face)
        if restorer == "CodeFormer":
            return net(face, weight=weight, adain=True)[0]
        return net(face, return_rgb=False, randomize_noise=False)[0]  # (A1111 draws fresh noise: see export/faces.py)

    np_image = picture[:, :, ::-1]
    helper.clean_all()
    helper.read_image(np_image)
    helper.get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)
    helper.align_warp_face()
    for cropped_face in helper.cropped_faces:
        face = cv2.cvtColor((cropped_face / 255.0).astype("float32"), cv2.COLOR_BGR2RGB)
        face = _normalize(torch.from_numpy(face.transpose(2, 0, 1)).float(), (0.5,) * 3, (0.5,) * 3).unsqueeze(0)
        with torch.no_grad():
            face = restore_face(face)
        face = ((face.squeeze(0).float().clamp_(-1, 1) + 1) / 2).numpy().transpose(1, 2, 0)
        helper.add_restored_face((cv2.cvtColor(face, cv2.COLOR_BGR2RGB) * 255.0).astype("uint8"))
    helper.get_inverse_affine(None)
    found = len(helper.cropped_faces)
    image = helper.paste_faces_to_input_image()[:, :, ::-1]
    helper.clean_all()
    return np.ascontiguousarray(image), found


# --- the tests ------------------------------------------------------------------------------------------------------
def assert_close(ours: np.ndarray, expected: np.ndarray) -> None:
    """The project's 2/255, but for a few pixels one level more: each face goes through two roundings of its own
    before the picture's (its restored crop truncated to 8 bits, the parser's argmax), so where two faces overlap
    onnxruntime's and torch's fp32 differences can add up to a third level (measured: 1 pixel of 15360)."""
    diff = np.abs(ours.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= MAX_PIXEL_DIFF + 1 and (diff > MAX_PIXEL_DIFF).mean() <= 1e-3, (diff.max(), (diff > 2).sum())


def test_the_steps_around_the_networks_are_facexlibs(helpers):
    """Detection, alignment, the restored face's rounding, the parser's mask and the paste, held to A1111 over
    facexlib with the same torch detector and parser and a stand-in restorer (the colours inverted)."""
    from sdtrt.postprocessing.faces import FaceNetworks, restore_faces

    def torch_net(module, *pick):
        def run(array: np.ndarray):
            with torch.no_grad():
                out = module(torch.from_numpy(array))
            return tuple(t.numpy() for t in out) if isinstance(out, tuple) else out.numpy()
        return run

    from sdtrt.export.faces import _Detector, _Parser

    inverted = {**helpers, "inverted": lambda face, **_: -face}
    nets = FaceNetworks(torch_net(_Detector(helpers["detector"]).eval()), torch_net(_Parser(helpers["parser"]).eval()),
                        lambda face: -face)
    for size in ((96, 64),):
        picture = sample_picture(*size)
        ours = np.asarray(restore_faces(Image.fromarray(picture), nets))
        expected, found = a1111_restore(picture, inverted, "inverted")
        assert found >= 1 and max_diff(ours[None], picture[None]) > 16
        assert max_diff(ours[None], expected[None]) <= 1


@slow
def test_each_file_is_registered_by_its_layout(local):
    assert set(local.spec.face_restorers) == {"GFPGAN", "CodeFormer"}
    assert {"face_detector", "face_parser", "face_restorer_gfpgan", "face_restorer_codeformer"} <= set(local.spec.components)
    assert local.spec.field("face_restorer").choices == ("", "GFPGAN", "CodeFormer")
    helpers = local.spec.extra["face_helpers"]
    assert helpers["detector"]["file"] == "detection_Resnet50_Final.safetensors"
    # TensorRT: one face a call (Triton never batches them), the detector over every picture it may get
    from sdtrt.export.tensorrt import EngineOptions, profile_shapes
    from sdtrt.model_repository.configs import engine_batching

    detector = profile_shapes(local.spec, local.spec.component("face_detector"), EngineOptions())
    assert detector == {"image": [(1, 3, 256, 256), (1, 3, 640, 640), (1, 3, 4096, 4096)]}
    codeformer = local.spec.component("face_restorer_codeformer")
    profile = profile_shapes(local.spec, codeformer, EngineOptions())
    assert profile["weight"] == [(1,), (1,), (1,)] and engine_batching(local.spec, codeformer, profile).max_batch_size == 0


@slow
@pytest.mark.parametrize("restorer, weight, size", [("GFPGAN", 0.5, (64, 64)), ("CodeFormer", 0.5, (64, 80)),
                                                    ("CodeFormer", 0.0, (96, 64))])
def test_faces_restored_as_a1111_restores_them(local, modules, restorer, weight, size):
    from sdtrt.postprocessing.faces import restore_faces

    picture = sample_picture(*size)
    nets = local.networks(local.plan(Txt2ImgRequest(prompt="x"))).face_networks(restorer, weight)
    ours = np.asarray(restore_faces(Image.fromarray(picture), nets))
    expected, found = a1111_restore(picture, modules, restorer, weight)
    assert found >= 1, "the tuned detector finds faces (else this compares nothing)"
    assert max_diff(ours[None], picture[None]) > 16, "the faces were pasted back"
    assert_close(ours, expected)


REQUEST = dict(prompt="a portrait", steps=3, seed=5, width=64, height=64, sampler="Euler a")


@slow
def test_restore_faces_runs_after_decoding_served_and_in_process(repo, local, modules, tmp_path):
    plain = local.txt2img(Txt2ImgRequest(**REQUEST))
    restored = local.txt2img(Txt2ImgRequest(**REQUEST, restore_faces=True))  # CodeFormer, weight 0.5: A1111's
    expected, _ = a1111_restore(plain.images[0], modules, "CodeFormer", 0.5)
    assert_close(restored.images[0], expected)
    assert "Face restoration: CodeFormer" in restored.infotexts[0] and "Face restoration" not in plain.infotexts[0]
    with triton_on(repo, tmp_path) as triton:
        client = Client(triton.url)
        served = client.txt2img(REQUEST["prompt"], **{k: v for k, v in REQUEST.items() if k != "prompt"},
                                restore_faces=True, face_restorer="GFPGAN")
        gfpgan, _ = a1111_restore(plain.images[0], modules, "GFPGAN")
        assert_close(served.images[0], gfpgan)
        assert "Face restoration: GFPGAN" in served.infotexts[0]
        through_the_gateway(TestClient(create_app(client)), plain.images[0], modules)
        on_the_page(client, plain.images[0], modules, tmp_path)


def on_the_page(client: Client, picture: np.ndarray, modules: dict, tmp_path) -> None:
    """The page's Extras tab: its GFPGAN slider (no upscale)."""
    from sdtrt.client.apps.ui import Page

    page = Page(client, tmp_path / "outputs", None)
    result, info = page.extras_handler(Image.fromarray(picture), "None", 1, 0.6, 0, 0)
    expected = Image.blend(Image.fromarray(picture), Image.fromarray(a1111_restore(picture, modules, "GFPGAN")[0]), 0.6)
    assert_close(np.asarray(result), np.asarray(expected))
    assert info == "GFPGAN visibility: 0.6"


def _png(picture: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _picture(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def through_the_gateway(api: TestClient, picture: np.ndarray, modules: dict) -> None:
    """A1111's routes: the face restorers listed, txt2img's restore_faces, Extras' GFPGAN and CodeFormer steps
    (each at its visibility, in A1111's order: GFPGAN, then CodeFormer)."""
    assert [item["name"] for item in api.get("/sdapi/v1/face-restorers").json()] == ["CodeFormer", "GFPGAN"]
    body = {"prompt": REQUEST["prompt"], "steps": 3, "seed": 5, "width": 64, "height": 64, "sampler_name": "Euler a",
            "restore_faces": True, "override_settings": {"face_restoration_model": "GFPGAN"}}
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text[:500]
    assert "Face restoration: GFPGAN" in json.loads(response.json()["info"])["infotexts"][0]
    gfpgan = {"image": _png(picture), "gfpgan_visibility": 0.6}
    response = api.post("/sdapi/v1/extra-single-image", json=gfpgan)
    assert response.status_code == 200, response.text[:500]
    first = _picture(response.json()["image"])
    expected = Image.blend(Image.fromarray(picture), Image.fromarray(a1111_restore(picture, modules, "GFPGAN")[0]), 0.6)
    assert_close(first, np.asarray(expected))
    # both: CodeFormer after GFPGAN, on GFPGAN's picture (the reference runs on the same one: a face the detector
    # finds just over its threshold on one picture may be just under it on one a level off)
    response = api.post("/sdapi/v1/extra-single-image", json={**gfpgan, "codeformer_visibility": 0.5,
                                                              "codeformer_weight": 0.3})
    assert response.status_code == 200, response.text[:500]
    codeformer = Image.fromarray(a1111_restore(first, modules, "CodeFormer", 0.3)[0])
    expected = np.asarray(Image.blend(Image.fromarray(first), codeformer, 0.5))
    assert_close(_picture(response.json()["image"]), expected)
    assert "CodeFormer weight: 0.3" in response.json()["html_info"]


@slow
def test_a_request_and_a_folder_that_cannot_restore_are_named(local, exported_repo, face_folder, tmp_path):
    with pytest.raises(InvalidRequest, match="restore_faces.*--face-restorers"):
        LocalPipeline(exported_repo).txt2img(Txt2ImgRequest(prompt="x", steps=1, restore_faces=True))
    with pytest.raises(InvalidRequest, match="face_restorer"):
        local.txt2img(Txt2ImgRequest(prompt="x", steps=1, restore_faces=True, face_restorer="RestoreFormer"))
    from sdtrt.export.faces import register_face_restorers

    only = tmp_path / "only-gfpgan"
    only.mkdir()
    (only / "GFPGANv1.4.safetensors").symlink_to(face_folder / "GFPGANv1.4.safetensors")
    with pytest.raises(UsageError, match="detection_Resnet50_Final.*parsing_parsenet"):
        register_face_restorers(only, False, report=lambda *_: None)
    save_file({"conv.weight": torch.zeros(1, 1, 1, 1)}, str(only / "notes.safetensors"))
    with pytest.raises(UsageError, match="notes.safetensors: not a face restorer"):
        register_face_restorers(only, False, report=lambda *_: None)


def test_the_resnet50_retinaface_builds_on_is_torchvisions(helpers):
    """sdtrt gives facexlib torchvision's ResNet-50 and IntermediateLayerGetter (torchvision does not load here):
    held to transformers' ResNet-50 (the same network under its own names), the detector's weights mapped."""
    from transformers import ResNetConfig, ResNetModel

    body = helpers["detector"].body
    config = ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                          embedding_size=64, hidden_act="relu")
    theirs = ResNetModel(config).eval()
    names = {"conv1": "embedder.embedder.convolution", "bn1": "embedder.embedder.normalization"}
    state = {}
    for key, value in body.state_dict().items():
        head, _, param = key.rpartition(".")
        if head in names:
            state[f"{names[head]}.{param}"] = value
            continue
        layer, block, part = head.split(".", 2)
        stage = f"encoder.stages.{int(layer[-1]) - 1}.layers.{block}"
        part = {"conv1": "layer.0.convolution", "bn1": "layer.0.normalization", "conv2": "layer.1.convolution",
                "bn2": "layer.1.normalization", "conv3": "layer.2.convolution", "bn3": "layer.2.normalization",
                "downsample.0": "shortcut.convolution", "downsample.1": "shortcut.normalization"}[part]
        state[f"{stage}.{part}.{param}"] = value
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all("num_batches_tracked" in k for k in missing), (missing, unexpected)
    picture = torch.rand(1, 3, 96, 64) * 255
    with torch.no_grad():
        ours = list(body(picture).values())
        stages = theirs(picture, output_hidden_states=True).hidden_states[2:]
    assert len(ours) == 3 and all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(ours, stages))


def test_a_picture_too_large_or_too_narrow_is_refused_before_a_network_runs():
    from sdtrt.postprocessing.faces import MAX_FACE_PIXELS, FaceNetworks, restore_faces

    def never(*_):
        raise AssertionError("no network may run")

    nets = FaceNetworks(never, never, never)
    with pytest.raises(InvalidRequest, match=f"over {MAX_FACE_PIXELS} pixels"):
        restore_faces(Image.new("RGB", (4097, 4096)), nets)
    with pytest.raises(InvalidRequest, match="too narrow for the face detector"):
        restore_faces(Image.new("RGB", (64, 1024)), nets)


def test_an_infotext_with_face_restoration_asks_for_it_again():
    from sdtrt.requests.generation import settings_from_infotext

    settings = settings_from_infotext("a portrait\nSteps: 3, Seed: 5, Face restoration: GFPGAN, Size: 64x64")
    assert settings["restore_faces"] is True and settings["face_restorer"] == "GFPGAN"
    assert "restore_faces" not in settings_from_infotext("a portrait\nSteps: 3, Seed: 5, Size: 64x64")


@slow
def test_a_face_file_removed_from_the_folder_goes_after_the_export_again(default_model, repo, face_folder, tmp_path):
    """The same export again, its face folder changed: only the face networks are touched (CodeFormer's removed),
    the rest of the model as it was; the restorer's choices follow."""
    import shutil

    from sdtrt.export import export_model

    live, folder = tmp_path / "repo", tmp_path / "faces"
    shutil.copytree(repo, live)
    shutil.copytree(face_folder, folder)
    (folder / "codeformer-v0.1.0.safetensors").unlink()
    key = LocalPipeline(live).spec.key
    unet = live / f"{key}__unet" / "1" / "model.onnx"
    before = unet.stat().st_mtime_ns
    said: list[str] = []
    export_model(default_model, live, progress=False, report=said.append, face_restorer_dir=folder)
    assert any("(0 exported, 1 removed)" in line for line in said), said[-3:]
    assert unet.stat().st_mtime_ns == before
    spec = LocalPipeline(live).spec
    assert set(spec.face_restorers) == {"GFPGAN"} and "face_restorer_codeformer" not in spec.components
    assert spec.field("face_restorer").choices == ("", "GFPGAN") and "face_helpers" in spec.extra
    assert not (live / f"{key}__face_restorer_codeformer").exists()
    restored = LocalPipeline(live).txt2img(Txt2ImgRequest(**REQUEST, restore_faces=True))  # GFPGAN now
    assert "Face restoration: GFPGAN" in restored.infotexts[0]
