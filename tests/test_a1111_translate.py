"""The gateway's A1111 translation as pure functions, without a server: A1111's requests (webuiapi's own payloads
among them) into sdtrt's settings, and sdtrt's answers checked against A1111's response shapes (the fields and
types of A1111's modules/api/models.py, written out below as strict models: a key A1111 lacks fails them)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, Optional

import numpy as np
import pytest
from fastapi import HTTPException
from PIL import Image
from pydantic import BaseModel, ConfigDict

from sdtrt.client.apps import a1111_responses as answer
from sdtrt.client.apps.a1111_requests import (
    ExtrasSingleImageBody, Img2ImgBody, Job, Txt2ImgBody, UserOptions, extras_face_steps, extras_job, ignored_fields,
    load_user_options, save_user_options, translate, updated_options,
)
from sdtrt.contract.errors import UsageError
from sdtrt.client.client import Progress
from sdtrt.contract.outputs import png_info
from sdtrt.contract.spec import load_catalog
from sdtrt.requests.generation import Generation
from sdtrt.requests.styles import PromptStyle

webuiapi = pytest.importorskip("webuiapi")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- A1111's response shapes (modules/api/models.py) -------------------------------------------------------
class SamplerItem(Strict):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(Strict):
    name: str
    label: str
    aliases: Optional[list[str]]
    default_rho: Optional[float]
    need_inner_model: Optional[bool]


class UpscalerItem(Strict):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str
    model_name: Optional[str]
    model_path: Optional[str]
    model_url: Optional[str]
    scale: Optional[float]


class SDModelItem(Strict):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    title: str
    model_name: str
    hash: Optional[str]
    sha256: Optional[str]
    filename: str
    config: Optional[str]


class EmbeddingItem(Strict):
    step: Optional[int]
    sd_checkpoint: Optional[str]
    sd_checkpoint_name: Optional[str]
    shape: int
    vectors: int


class EmbeddingsResponse(Strict):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class ProgressResponse(Strict):
    progress: float
    eta_relative: float
    state: dict
    current_image: Optional[str] = None
    textinfo: Optional[str] = None


class PNGInfoResponse(Strict):
    info: str
    items: dict
    parameters: dict


class TextToImageResponse(Strict):
    images: Optional[list[str]] = None
    parameters: dict
    info: str


class ExtrasSingleImageResponse(Strict):
    html_info: str
    image: Optional[str] = None


class MemoryResponse(Strict):
    ram: dict
    cuda: dict


# A1111's shared.state.dict(): what /progress's "state" holds
STATE_KEYS = {"skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp", "job_no",
              "sampling_step", "sampling_steps"}
# The keys of A1111's processing info (Processed.js()) that its clients read
INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
             "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
             "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
             "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
             "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
             "is_using_inpainting_conditioning", "version"}


@pytest.fixture(scope="module")
def catalog(exported_repo):
    return load_catalog(exported_repo)


def png(size=(8, 8), text: str | None = None) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG", pnginfo=png_info(text) if text else None)
    return base64.b64encode(buffer.getvalue()).decode()


class Recorder:
    """Where webuiapi sends its request: the payload is kept, nothing is answered (no server in these tests)."""

    def __init__(self):
        self.payloads: list[tuple[str, dict]] = []

    def post(self, url, json=None, **_):
        self.payloads.append((url.rsplit("/", 1)[-1], json))
        raise ConnectionAbortedError("recorded")


def webuiapi_payload(call: str, **kwargs) -> dict:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=1, sampler="Euler a", steps=4)
    api.session = recorder = Recorder()
    with pytest.raises(ConnectionAbortedError):
        getattr(api, call)(**kwargs)
    ((route, payload),) = recorder.payloads
    assert route == call
    return payload


def refused(excinfo) -> tuple[str, str]:
    (detail,) = excinfo.value.detail
    return detail["loc"][-1], detail["msg"]


# --- requests -------------------------------------------------------------------------------------------------
def test_webuiapis_txt2img_payload_translates_with_its_defaults(catalog):
    payload = webuiapi_payload("txt2img", prompt="cute squirrel", negative_prompt="ugly", seed=1003, cfg_scale=7,
                               width=64, height=64, styles=["nowhere"])
    body = Txt2ImgBody(**payload)
    settings = translate(body, UserOptions(), {}, catalog)
    assert settings["prompt"] == "cute squirrel" and settings["negative_prompt"] == "ugly"
    assert (settings["seed"], settings["guidance_scale"], settings["width"], settings["steps"]) == (1003, 7, 64, 4)
    assert settings["sampler"] == "Euler a" and settings["model"] == catalog.default
    assert settings["clip_skip"] == 1 and settings["randn_source"] == "CPU"
    assert "denoising_strength" not in settings  # A1111 ignores it without hires fix; webuiapi sends 0.7
    assert 0 <= settings["subseed"] and payload["subseed"] == -1  # resolved here, so info can name it
    assert ignored_fields(body, {}) == ["styles.nowhere"]  # webuiapi's keys are all A1111's


def test_webuiapis_img2img_payload_translates_its_numbered_choices(catalog):
    picture = Image.new("RGB", (64, 64))
    payload = webuiapi_payload("img2img", images=[picture], prompt="a cat", resize_mode=1, inpainting_fill=2,
                               mask_blur=7, denoising_strength=0.5, steps=3, seed=5)
    body = Img2ImgBody(**payload)
    settings = translate(body, UserOptions(), {}, catalog)
    assert settings["resize_mode"] == "Crop and resize" and settings["inpainting_fill"] == "latent noise"
    assert settings["mask_blur"] == 7 and settings["denoising_strength"] == 0.5 and settings["steps"] == 3
    blur = translate(Img2ImgBody(**{**payload, "mask_blur": None, "mask_blur_x": 2, "mask_blur_y": 9}),
                     UserOptions(), {}, catalog)["mask_blur"]
    assert blur == 9  # A1111 blurs by the larger of its two


def test_numbered_choices_come_from_the_registry_by_number_and_from_an_infotext_by_name(catalog):
    """The fields the registry marks ``a1111_numbered`` (resize_mode, inpainting_fill): a number out of range is
    refused naming the field and its choices; an infotext's words ("Masked content: latent nothing") become the
    number A1111's API would send."""
    picture = Image.new("RGB", (64, 64))
    payload = webuiapi_payload("img2img", images=[picture], prompt="a cat", steps=3, seed=5)
    with pytest.raises(HTTPException) as refused:
        translate(Img2ImgBody(**{**payload, "inpainting_fill": 4}), UserOptions(), {}, catalog)
    detail = refused.value.detail[0]
    assert detail["loc"] == ["body", "inpainting_fill"]
    assert detail["msg"] == "0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)"
    infotext = "a cat\nSteps: 3, Resize mode: Crop and resize, Masked content: latent nothing, Seed: 5"
    body = Img2ImgBody(**{k: v for k, v in payload.items() if k not in ("resize_mode", "inpainting_fill")},
                       infotext=infotext)
    settings = translate(body, UserOptions(), {}, catalog)
    assert settings["resize_mode"] == "Crop and resize" and settings["inpainting_fill"] == "latent nothing"
    with pytest.raises(HTTPException) as refused:
        translate(Img2ImgBody(**{**payload, "infotext": "a cat\nSteps: 3, Masked content: everything, Seed: 5"}), UserOptions(), {},
                  catalog)
    assert refused.value.detail[0]["loc"] == ["body", "inpainting_fill"]


@pytest.mark.parametrize("given, wanted", [
    ({"sampler_name": "k_euler_a"}, {"sampler": "Euler a"}),
    ({"sampler_index": "k_dpmpp_2m"}, {"sampler": "DPM++ 2M"}),
    ({"scheduler": "sgm_uniform"}, {"schedule_type": "SGM Uniform"}),
    ({"scheduler": "Karras"}, {"schedule_type": "Karras"}),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2, "randn_source": "GPU"}},
     {"clip_skip": 2, "randn_source": "NV"}),
    ({"enable_hr": True, "hr_upscaler": "Latent (nearest)", "denoising_strength": 0.4},
     {"hr_upscaler": "Latent (nearest)", "denoising_strength": 0.4}),
    ({"restore_faces": True, "override_settings": {"face_restoration_model": "GFPGAN", "code_former_weight": 0.3}},
     {"restore_faces": True, "face_restorer": "GFPGAN", "code_former_weight": 0.3}),
    ({"override_settings": {"face_restoration": True}}, {"restore_faces": True}),
])
def test_a1111s_names_become_sdtrts(catalog, given, wanted):
    settings = translate(Txt2ImgBody(prompt="x", **given), UserOptions(), {}, catalog)
    assert {k: settings[k] for k in wanted} == wanted


@pytest.mark.parametrize("given, field", [
    ({"override_settings": {"tiling": "yes"}}, "override_settings.tiling"),
    ({"restore_faces": True, "override_settings": {"code_former_weight": 2}}, "override_settings.code_former_weight"),
    ({"override_settings": {"face_restoration": "on"}}, "override_settings.face_restoration"),
    ({"override_settings": {"randn_source": "TPU"}}, "override_settings.randn_source"),
    ({"override_settings": {"eta_noise_seed_delta": -5}}, "override_settings.eta_noise_seed_delta"),
    ({"override_settings": {"s_churn": "lots"}}, "override_settings.s_churn"),
    ({"override_settings": {"sd_model_checkpoint": "no such model"}}, "override_settings.sd_model_checkpoint"),
    ({"n_iter": 10_000}, "n_iter"),
    ({"styles": ["s"] * 65}, "styles"),
    ({"override_settings": {"beta_dist_alpha": 0.0}}, "override_settings.beta_dist_alpha"),
    ({"override_settings": {"sd_noise_schedule": "Cosine"}}, "override_settings.sd_noise_schedule"),
    ({"override_settings": {"sgm_noise_multiplier": "on"}}, "override_settings.sgm_noise_multiplier"),
    ({"override_settings": {"emphasis": "Strong"}}, "override_settings.emphasis"),
    ({"override_settings": {"hires_fix_refiner_pass": "third pass"}}, "override_settings.hires_fix_refiner_pass"),
    ({"override_settings": {"pad_cond_uncond_v0": 1}}, "override_settings.pad_cond_uncond_v0"),
])
def test_what_would_change_the_picture_is_refused_by_name(catalog, given, field):
    with pytest.raises(HTTPException) as excinfo:
        translate(Txt2ImgBody(prompt="x", **given), UserOptions(), {}, catalog)
    assert excinfo.value.status_code == 422 and refused(excinfo)[0] == field


def test_values_sdtrt_draws_anyway_are_accepted(catalog):
    settings = translate(Txt2ImgBody(prompt="x", sampler_name="Euler a", eta=1.0, tiling=False, s_noise=1.0,
                                     override_settings={"eta_ancestral": 1, "sd_vae": "Automatic"}),
                         UserOptions(), {}, catalog)
    assert settings["sampler"] == "Euler a"


def test_sampler_settings_come_from_the_request_else_the_users_options(catalog):
    """A1111 (processing.py): a request's eta, s_* win; null takes the option (eta: eta_ancestral, DDIM eta_ddim);
    ENSD is an option only."""
    mine = UserOptions(sampler={"eta_ancestral": 0.3, "eta_ddim": 0.2, "s_churn": 2.0, "eta_noise_seed_delta": 31337})
    settings = translate(Txt2ImgBody(prompt="x", sampler_name="Euler a", s_noise=0.9), mine, {}, catalog)
    assert {k: settings[k] for k in ("eta", "s_churn", "s_noise", "s_tmax", "eta_noise_seed_delta")} == \
        {"eta": 0.3, "s_churn": 2.0, "s_noise": 0.9, "s_tmax": 0.0, "eta_noise_seed_delta": 31337}
    settings = translate(Txt2ImgBody(prompt="x", sampler_name="DDIM", s_churn=0.0,
                                     override_settings={"eta_noise_seed_delta": 7}), mine, {}, catalog)
    assert (settings["eta"], settings["s_churn"], settings["eta_noise_seed_delta"]) == (0.2, 0.0, 7)
    settings = translate(Txt2ImgBody(prompt="x", sampler_name="Euler a", eta=0.8), UserOptions(), {}, catalog)
    assert (settings["eta"], settings["eta_noise_seed_delta"]) == (0.8, 0)
    # the sampler's own eta stays unset, so that the infotext has no "Eta", as A1111's
    assert "eta" not in translate(Txt2ImgBody(prompt="x", sampler_name="Euler a", eta=1.0), UserOptions(), {}, catalog)
    assert "eta" not in translate(Txt2ImgBody(prompt="x", sampler_name="Euler", eta=0.5), UserOptions(), {}, catalog)


def test_a1111s_schedule_options_reach_the_request_from_the_override_the_users_options_or_an_infotext(catalog):
    overrides = {"sigma_min": 0.1, "sigma_max": 10, "rho": 5, "beta_dist_alpha": 0.4, "sgm_noise_multiplier": True,
                 "emphasis": "No norm", "pad_cond_uncond_v0": True, "refiner_switch_by_sample_steps": True,
                 "hires_fix_refiner_pass": "both passes",
                 "sd_noise_schedule": "Zero Terminal SNR", "always_discard_next_to_last_sigma": True,
                 "img2img_extra_noise": 0.3}
    settings = translate(Txt2ImgBody(prompt="x", override_settings=overrides), UserOptions(), {}, catalog)
    renamed = {"pad_cond_uncond_v0": "pad_conds_v0", "refiner_switch_by_sample_steps": "refiner_switch_by_steps",
               "hires_fix_refiner_pass": "hires_refiner_pass"}
    assert {renamed.get(k, k): settings[renamed.get(k, k)] for k in overrides if k != "img2img_extra_noise"} == \
        {renamed.get(k, k): v for k, v in overrides.items() if k != "img2img_extra_noise"}
    assert "img2img_extra_noise" not in settings  # (img2img's and the hires pass's)
    settings = translate(Img2ImgBody(init_images=["x"]), UserOptions(sampler={"img2img_extra_noise": 0.3},
                                                                     options={"use_downcasted_alpha_bar": True}),
                         {}, catalog)
    assert settings["img2img_extra_noise"] == 0.3 and settings["use_downcasted_alpha_bar"] is True
    plain = translate(Txt2ImgBody(prompt="x"), UserOptions(), {}, catalog)
    assert not {"sigma_min", "beta_dist_alpha", "sd_noise_schedule", "sgm_noise_multiplier"} & set(plain)
    infotext = ("a fox\nSteps: 5, Sampler: Euler, Schedule type: Beta, Seed: 3, Size: 64x64, Beta schedule alpha: 0.4, "
                "Beta schedule beta: 0.6, Noise Schedule: Zero Terminal SNR, SGM noise multiplier: False")
    settings = translate(Txt2ImgBody(infotext=infotext), UserOptions(), {}, catalog)
    assert (settings["beta_dist_alpha"], settings["sd_noise_schedule"]) == (0.4, "Zero Terminal SNR")
    assert "sgm_noise_multiplier" not in settings  # "False" is false


def test_an_infotexts_settings_are_read_as_override_settings(catalog):
    """Clip skip, ENSD and RNG are A1111 options: an infotext's apply as override_settings, which a request's
    own override_settings beat."""
    infotext = "a fox\nSteps: 5, Sampler: Euler a, Seed: 3, Size: 64x64, Clip skip: 2, ENSD: 31337, RNG: NV"
    settings = translate(Txt2ImgBody(infotext=infotext), UserOptions(), {}, catalog)
    assert (settings["clip_skip"], settings["eta_noise_seed_delta"], settings["randn_source"]) == (2, 31337, "NV")
    settings = translate(Txt2ImgBody(infotext=infotext, override_settings={"eta_noise_seed_delta": 5}),
                         UserOptions(), {}, catalog)
    assert settings["eta_noise_seed_delta"] == 5


def test_user_options_are_saved_whole_and_a_damaged_file_is_named(tmp_path):
    users = {"": UserOptions(clip_skip=2, sampler={"s_churn": 1.5}, options={"jpeg_quality": 90}),
             "alice": UserOptions(randn_source="NV", model="other")}
    path = tmp_path / "deep" / "options.json"
    save_user_options(path, users)
    assert load_user_options(path) == users and load_user_options(tmp_path / "absent.json") == {}
    path.write_text("{not json")
    with pytest.raises(UsageError, match="options.json: not an sdtrt options file"):
        load_user_options(path)


def test_styles_and_infotext_fill_the_request_and_given_fields_win(catalog):
    styles = {"Dusk": PromptStyle("Dusk", "{prompt}, at dusk", "blurry")}
    settings = translate(Txt2ImgBody(prompt="a barn", styles=["Dusk"]), UserOptions(), styles, catalog)
    assert settings["prompt"] == "a barn, at dusk" and settings["negative_prompt"] == "blurry"
    infotext = "a fox\nNegative prompt: rain\nSteps: 7, Sampler: DPM++ 2M, CFG scale: 5, Seed: 42, Size: 64x96"
    settings = translate(Txt2ImgBody(infotext=infotext, steps=3), UserOptions(), {}, catalog)
    assert (settings["prompt"], settings["negative_prompt"], settings["seed"]) == ("a fox", "rain", 42)
    assert (settings["width"], settings["height"], settings["sampler"], settings["steps"]) == (64, 96, "DPM++ 2M", 3)


def test_a_users_options_are_kept_checked_and_used(catalog):
    spec = catalog.get(None)
    mine = updated_options(UserOptions(), {"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": spec.title,
                                           "samples_format": "jpg", "randn_source": "NV"}, catalog, spec)
    assert (mine.clip_skip, mine.model, mine.randn_source) == (2, spec.key, "NV")
    assert mine.options == {"samples_format": "jpg"}  # kept for GET, as A1111 keeps options it has no use for
    assert translate(Txt2ImgBody(prompt="x"), mine, {}, catalog)["clip_skip"] == 2
    shown = answer.options_response(mine, spec)
    assert shown["CLIP_stop_at_last_layers"] == 2 and shown["sd_model_checkpoint"] == spec.title
    assert shown["samples_format"] == "png"  # what sdtrt writes, whatever was kept
    with pytest.raises(HTTPException) as excinfo:
        updated_options(mine, {"CLIP_stop_at_last_layers": 99}, catalog, spec)
    assert refused(excinfo)[0] == "options.CLIP_stop_at_last_layers"


def test_extras_requests_are_bounded_by_name():
    body = ExtrasSingleImageBody(image=png(), upscaler_1="Lanczos", upscaling_resize=2)
    assert extras_job(body).upscaler_1 == "Lanczos"
    for given, field in [({"upscaler_1": "ESRGAN_9x"}, "upscaler_1"), ({"upscaling_resize": 20}, "upscaling_resize"),
                         ({"image": ""}, "image")]:
        with pytest.raises(HTTPException) as excinfo:
            extras_job(ExtrasSingleImageBody(**{**body.model_dump(), **given}))
        assert refused(excinfo)[0] == field
    # the face steps: a restorer the server has, at a share from 0 to 1
    assert extras_face_steps(ExtrasSingleImageBody(**{**body.model_dump(), "gfpgan_visibility": 0.5}),
                             ("GFPGAN",)).restorers() == ["GFPGAN"]
    for given, field in [({"gfpgan_visibility": 0.5}, "gfpgan_visibility"), ({"codeformer_weight": 1.5}, "codeformer_weight"),
                         ({"codeformer_visibility": 0.2}, "codeformer_visibility")]:
        with pytest.raises(HTTPException) as excinfo:
            extras_face_steps(ExtrasSingleImageBody(**{**body.model_dump(), **given}), ())
        assert refused(excinfo)[0] == field


# --- responses ------------------------------------------------------------------------------------------------
def test_the_lists_have_a1111s_item_shapes(catalog):
    spec = catalog.get(None)
    for item in answer.sampler_list():
        SamplerItem(**item)
    assert {"Euler a", "DPM++ 2M"} <= {s["name"] for s in answer.sampler_list()}
    schedulers = [SchedulerItem(**item) for item in answer.scheduler_list()]
    assert {"automatic", "karras", "sgm_uniform"} <= {s.name for s in schedulers}
    for item in answer.upscaler_list(catalog):
        UpscalerItem(**item)
    assert [SDModelItem(**item).title for item in answer.sd_model_list(catalog)] == [
        s.title for s in catalog.models.values()]
    EmbeddingsResponse(**answer.embedding_list(spec))
    assert all(set(item) == {"name"} for item in answer.latent_upscale_modes())


def test_a_generation_answers_in_a1111s_shape(catalog):
    spec = catalog.get(None)
    body = Txt2ImgBody(prompt="a fox", seed=3, batch_size=2, width=64, height=64)
    settings = translate(body, UserOptions(), {}, catalog)
    result = Generation(np.zeros((2, 64, 64, 3), np.uint8), [3, 4], ["a fox\nSeed: 3", "a fox\nSeed: 4"])
    job = Job.for_request("txt2img", body, "")
    response = TextToImageResponse(**answer.generation_response(body, settings, result, spec, job, ["x"]))
    info = json.loads(response.info)
    assert INFO_KEYS <= set(info) and set(info) - INFO_KEYS == {"sdtrt_ignored_fields"}
    assert info["all_seeds"] == [3, 4] and info["all_subseeds"][1] == info["subseed"] + 1
    assert info["sdtrt_ignored_fields"] == ["x"] and response.parameters["prompt"] == "a fox"
    first = Image.open(io.BytesIO(base64.b64decode(response.images[0])))
    assert first.size == (64, 64) and first.info["parameters"] == "a fox\nSeed: 3"
    quiet = Txt2ImgBody(prompt="a fox", send_images=False)
    assert answer.generation_response(quiet, settings, result, spec, job, [])["images"] == []


def test_progress_has_a1111s_shape_idle_and_under_way(catalog):
    idle = ProgressResponse(**answer.progress_response(None, None))
    assert idle.progress == 0 and set(idle.state) == STATE_KEYS
    job = Job.for_request("txt2img", Txt2ImgBody(prompt="x", n_iter=2), "")
    job.done = 1
    preview = np.full((8, 8, 3), 128, np.uint8)
    under_way = ProgressResponse(**answer.progress_response(job, Progress(5, 10, preview), now=job.started + 3))
    assert under_way.progress == pytest.approx(0.75) and under_way.eta_relative == pytest.approx(1.0)
    assert set(under_way.state) == STATE_KEYS and under_way.state["sampling_step"] == 5
    assert under_way.current_image is not None
    assert answer.progress_response(job, Progress(5, 10, preview), skip_current_image=True)["current_image"] is None


def test_png_info_splits_size_as_a1111(catalog):
    text = "a fox\nNegative prompt: rain\nSteps: 7, Seed: 42, Size: 64x96"
    response = PNGInfoResponse(**answer.png_info_response(png(text=text)))
    assert response.info == text and response.parameters["Size-1"] == "64" and response.parameters["Size-2"] == "96"
    assert response.parameters["Prompt"] == "a fox" and response.parameters["Negative prompt"] == "rain"
    with pytest.raises(HTTPException) as excinfo:
        answer.png_info_response(None)
    assert refused(excinfo)[0] == "image"


def test_extras_and_memory_answer_in_a1111s_shape():
    result = Image.new("RGB", (16, 16))
    shown = ExtrasSingleImageResponse(**answer.extras_response(result, {"parameters": "a fox"},
                                                               {"Postprocess upscale by": 2}, True))
    kept = Image.open(io.BytesIO(base64.b64decode(shown.image)))
    assert kept.info == {"parameters": "a fox", "postprocessing": "Postprocess upscale by: 2"}
    assert answer.extras_response(result, {}, {}, False) == {"html_info": "", "image": None}
    metrics = ('nv_cpu_memory_total_bytes 1000\nnv_cpu_memory_used_bytes 400\n'
               'nv_gpu_memory_total_bytes{gpu_uuid="a"} 80\nnv_gpu_memory_used_bytes{gpu_uuid="a"} 20\n'
               'nv_gpu_memory_total_bytes{gpu_uuid="b"} 80\nnv_gpu_memory_used_bytes{gpu_uuid="b"} 30\n')
    memory = MemoryResponse(**answer.memory_response(metrics))
    assert memory.ram == {"free": 600, "used": 400, "total": 1000}
    assert memory.cuda == {"system": {"free": 110, "used": 50, "total": 160}}
    assert MemoryResponse(**answer.memory_response(None)).ram == {"error": "no --metrics-url"}


def test_tiling_is_the_requests_else_the_override_else_the_users_option(catalog):
    """A1111 reads p.tiling, and where it is null opts.tiling (an override or the user's stored option)."""
    def tiling(body: dict, options: dict | None = None) -> bool:
        return translate(Txt2ImgBody(prompt="x", **body), UserOptions(options=options or {}), {}, catalog)["tiling"]

    assert tiling({}) is False and tiling({"tiling": True}) is True
    assert tiling({"override_settings": {"tiling": True}}) is True
    assert tiling({}, {"tiling": True}) is True and tiling({"tiling": False}, {"tiling": True}) is False
    assert "override_settings.tiling" not in ignored_fields(Txt2ImgBody(prompt="x", override_settings={"tiling": True}),
                                                            {})


def test_img2img_fix_steps_and_prompt_comments_are_read_from_the_override_else_the_users_option(catalog):
    def settings(body: dict, options: dict | None = None) -> dict:
        return translate(Img2ImgBody(init_images=["x"], **body), UserOptions(options=options or {}), {}, catalog)

    assert settings({})["img2img_fix_steps"] is False
    assert settings({"override_settings": {"img2img_fix_steps": True}})["img2img_fix_steps"] is True
    assert settings({}, {"img2img_fix_steps": True})["img2img_fix_steps"] is True
    assert settings({"prompt": "a cat # not a dog"})["prompt"] == "a cat \n"
    assert settings({"prompt": "a cat # not a dog"}, {"enable_prompt_comments": False})["prompt"] == "a cat # not a dog"


def test_the_noise_multiplier_is_img2imgs_and_ngms_all_steps_either_tabs(catalog):
    def settings(body: dict, options: dict | None = None, tab=Img2ImgBody) -> dict:
        extra = {"init_images": ["x"]} if tab is Img2ImgBody else {}
        return translate(tab(prompt="x", **extra, **body), UserOptions(options=options or {}), {}, catalog)

    assert settings({})["initial_noise_multiplier"] == 1.0
    assert settings({"initial_noise_multiplier": 0.9})["initial_noise_multiplier"] == 0.9
    assert settings({}, {"initial_noise_multiplier": 0.8})["initial_noise_multiplier"] == 0.8
    ngms_all = {"override_settings": {"s_min_uncond_all": True}}
    assert settings(ngms_all, tab=Txt2ImgBody)["s_min_uncond_all"] is True
    assert "initial_noise_multiplier" not in settings(ngms_all, tab=Txt2ImgBody)
    assert settings(ngms_all)["initial_noise_multiplier"] == 1.0


def test_the_hires_pass_takes_a1111s_sampler_scheduler_and_resize_fields(catalog):
    def hires(**body) -> dict:
        settings = translate(Txt2ImgBody(prompt="x", enable_hr=True, **body), UserOptions(), {}, catalog)
        return {k: v for k, v in settings.items() if k in ("hr_sampler", "hr_schedule_type", "hr_resize_x",
                                                           "hr_resize_y")}

    assert hires(hr_sampler_name="Use same sampler", hr_scheduler="Use same scheduler") == {"hr_resize_x": 0,
                                                                                            "hr_resize_y": 0}
    assert hires(hr_sampler_name="k_dpmpp_2m", hr_scheduler="sgm_uniform", hr_resize_x=128) == {
        "hr_sampler": "DPM++ 2M", "hr_schedule_type": "SGM Uniform", "hr_resize_x": 128, "hr_resize_y": 0}


def test_a1111s_legacy_first_phase_size_is_the_first_pass_and_a_half_one_is_refused(catalog):
    settings = translate(Txt2ImgBody(prompt="x", width=128, height=128, firstphase_width=64, firstphase_height=80,
                                     enable_hr=True, hr_scale=2), UserOptions(), {}, catalog)
    assert (settings["width"], settings["height"], settings["hr_scale"]) == (64, 80, 2)
    with pytest.raises(HTTPException) as excinfo:
        translate(Txt2ImgBody(prompt="x", firstphase_width=64), UserOptions(), {}, catalog)
    assert excinfo.value.detail[0]["loc"] == ["body", "firstphase_height"]


def test_clip_skip_reaches_sdxl_as_a1111_applies_it(catalog):
    """A1111 applies Clip skip to SDXL only with its option sdxl_clip_l_skip (then to CLIP-L alone: the text
    encoder's own test is tests/test_sdxl.py); SD 1.x takes it as it is."""
    from dataclasses import replace as changed

    from sdtrt.contract.spec import Catalog

    spec = catalog.get()
    text = spec.component("text_encoder")
    pooled = changed(text.outputs[0], name="pooled_embeddings")
    sdxl = changed(spec, components={**spec.components, "text_encoder": changed(text, outputs=(*text.outputs, pooled))})
    xl = Catalog(spec.key, {spec.key: sdxl})
    body = {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 2}}
    assert translate(Txt2ImgBody(**body), UserOptions(), {}, catalog)["clip_skip"] == 2
    settings = translate(Txt2ImgBody(**body), UserOptions(), {}, xl)
    assert (settings["clip_skip"], settings["sdxl_clip_l_skip"]) == (1, False)
    settings = translate(Txt2ImgBody(**body), UserOptions(options={"sdxl_clip_l_skip": True}), {}, xl)
    assert (settings["clip_skip"], settings["sdxl_clip_l_skip"]) == (2, True)


def test_a1111s_unipc_options_reach_the_request(catalog):
    overrides = {"uni_pc_variant": "bh2", "uni_pc_skip_type": "logSNR", "uni_pc_order": 2,
                 "uni_pc_lower_order_final": False}
    settings = translate(Txt2ImgBody(prompt="x", sampler_name="UniPC", override_settings=overrides), UserOptions(),
                         {}, catalog)
    assert {k: settings[k] for k in ("unipc_variant", "unipc_skip_type", "unipc_order", "unipc_lower_order_final")} \
        == {"unipc_variant": "bh2", "unipc_skip_type": "logSNR", "unipc_order": 2, "unipc_lower_order_final": False}
    plain = translate(Txt2ImgBody(prompt="x", sampler_name="UniPC"), UserOptions(), {}, catalog)
    assert not {"unipc_variant", "unipc_order", "unipc_lower_order_final"} & set(plain)
    with pytest.raises(HTTPException) as excinfo:  # (A1111's third variant: not diffusers', not served)
        translate(Txt2ImgBody(prompt="x", override_settings={"uni_pc_variant": "vary_coeff"}), UserOptions(), {},
                  catalog)
    assert refused(excinfo)[0] == "override_settings.uni_pc_variant"


def test_a1111s_esrgan_tile_options_are_the_upscaler_models_tiles(catalog):
    settings = translate(Txt2ImgBody(prompt="x", override_settings={"ESRGAN_tile": 256, "ESRGAN_tile_overlap": 16,
                                                                    "sdxl_crop_top": 32, "comma_padding_backtrack": 0}),
                         UserOptions(), {}, catalog)
    assert settings["comma_padding_backtrack"] == 0
    assert (settings["upscaler_tile"], settings["upscaler_tile_overlap"]) == (256, 16)
    assert settings["sdxl_crop_top"] == 32 and "sdxl_crop_left" not in settings
    assert "upscaler_tile" not in translate(Txt2ImgBody(prompt="x"), UserOptions(), {}, catalog)
    with pytest.raises(HTTPException) as excinfo:
        translate(Txt2ImgBody(prompt="x", override_settings={"ESRGAN_tile": 4096}), UserOptions(), {}, catalog)
    assert refused(excinfo)[0] == "override_settings.ESRGAN_tile"
