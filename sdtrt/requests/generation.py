"""What a txt2img run gives back, and the infotext that describes each image."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.samplers import DEFAULT_RHO, DEFAULT_SCHEDULE, SAMPLERS, SamplerSettings, resolve
from sdtrt.contract.seeds import image_seeds
from sdtrt.contract.spec import ModelSpec
from sdtrt.requests.controlnet import infotext_entries
from sdtrt.requests.fields import BY_NAME, FIELDS, INFOTEXT_FIELDS
from sdtrt.requests.infotext import build_infotext, parse_infotext
from sdtrt.requests.plan import Plan
from sdtrt.requests.request import Txt2ImgRequest, face_restorer, hires_request

# The schedule types A1111 hands its sigma range to that read it (sd_schedulers: the others ignore it)
RANGED_SCHEDULES = ("Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Normal", "Beta")


@dataclass
class Generation:
    images: np.ndarray  # [N, H, W, 3] uint8
    seeds: list[int]  # seed of each image (request seed + i)
    infotexts: list[str]  # AUTOMATIC1111 infotext of each image


def infotexts(plan: Plan) -> list[str]:
    """One infotext per image of a plan, with that image's own seed, the fields in A1111's order; unused ones left
    out."""
    request, model, inpaint = plan.request, plan.spec, plan.inpaint
    img2img = plan.img2img
    hires = plan.hires is not None
    vae = model.vaes[request.vae] if request.vae else model.extra.get("vae")  # (registered, or the export's)
    lora_hashes = [f"{lora['name']}: {lora['sha256'][:12]}" for lora in model.extra.get("loras", [])]  # fused
    lora_hashes += [f"{name}: {model.loras[name]['hash'][:12]}" for name in plan.lora_names]
    embeddings = plan.embeddings
    # A1111 (1.9+) names the schedule it ran, Automatic's choice included ("DPM++ 2M" on Automatic: Karras)
    _, schedule = resolve(request.sampler, request.schedule_type, model.schedules)
    changed = changed_fields(request, model)  # the same for every image
    control_entries = infotext_entries(plan.controls)
    texts = []
    for i, seed in enumerate(plan.seeds):
        varied = request.subseed_strength > 0
        resized = bool(request.hr_resize_x or request.hr_resize_y)  # A1111 writes the one it resized by
        params = {
            "Steps": request.steps,
            "Sampler": request.sampler,
            "Schedule type": None if schedule == "Automatic" else schedule,
            "CFG scale": request.guidance_scale,
            "Seed": seed,
            "Face restoration": face_restorer(model, request.face_restorer) if request.restore_faces else None,
            "Size": f"{request.width}x{request.height}",
            "Model hash": model.model_hash,
            "Model": model.name or model.model_name,
            "VAE hash": vae["sha256"][:10] if vae else None,  # A1111 names a VAE file it loaded in place of the model's
            "VAE": vae["name"] if vae else None,
            "Denoising strength": request.denoising_strength if img2img or hires else None,
            "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
            "Emphasis": request.emphasis if request.emphasis != "Original" and _brackets(request) else None,
            "Variation seed": request.subseed + i if varied else None,
            "Variation seed strength": request.subseed_strength if varied else None,
            "Seed resize from": f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
            if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0 else None,
            "Resize mode": request.resize_mode if img2img and request.resize_mode != "Just resize" else None,
            **soft_inpainting_params(request, inpaint),
            **schedule_option_params(request, model, img2img, hires),
            "Mask blur": request.mask_blur if inpaint else None,
            "Masked content": request.inpainting_fill if inpaint and request.inpainting_fill != "original" else None,
            "Inpaint area": "Only masked" if inpaint and request.inpaint_full_res else None,
            "Masked area padding": request.inpaint_full_res_padding if inpaint and request.inpaint_full_res else None,
            "Hires upscale": request.hr_scale if hires and not resized else None,
            "Hires resize": f"{request.hr_resize_x}x{request.hr_resize_y}" if hires and resized else None,
            "Hires steps": request.hr_second_pass_steps if hires and request.hr_second_pass_steps else None,
            "Hires upscaler": request.hr_upscaler if hires else None,
            "Hires checkpoint": request.hr_checkpoint if plan.hires_model is not None else None,
            # (A1111 writes these when the refiner takes over; sdtrt when one is named that can)
            "Hires refiner": request.hires_refiner_pass if plan.refiner is not None and hires
            and request.hires_refiner_pass != "second pass" else None,
            "Refiner": request.refiner_checkpoint if plan.refiner is not None else None,
            "Refiner switch at": request.refiner_switch_at if plan.refiner is not None else None,
            "Refiner switch by sampling steps": True if plan.refiner is not None and request.refiner_switch_by_steps
            else None,
            # (A1111 writes it once NGMS has skipped a call on every step)
            "NGMS all steps": True if request.s_min_uncond_all and request.s_min_uncond > 0 else None,
            "RNG": request.randn_source,  # A1111 writes it for every source but its default, GPU
            # As A1111 lists the LoRAs it applied (fused at export, then the prompts' tags) and the embeddings the
            # prompts used: name, then the first 12 digits of A1111's hash of the file.
            "Lora hashes": ", ".join(lora_hashes) or None,
            "TI hashes": ", ".join(f"{name}: {model.embeddings[name]['sha256'][:12]}" for name in embeddings) or None,
            **control_entries,  # (sd-webui-controlnet's, among the extensions' params)
        }
        params.update({k: v for k, v in changed.items() if k not in params})
        if SAMPLERS[request.sampler].t_function and "Eta" in params:  # A1111's CompVis samplers' own key
            params["Eta DDIM"] = params.pop("Eta")
        texts.append(build_infotext(request.prompt, request.negative_prompt, params))
    return texts


def _brackets(request: Txt2ImgRequest) -> bool:
    """Whether a text holds a bracket, which is when A1111 names a mode of emphasis but Original."""
    texts = (request.prompt, request.negative_prompt, getattr(request, "hr_prompt", ""),
             getattr(request, "hr_negative_prompt", ""))
    return any("(" in text or "[" in text for text in texts)


def schedule_option_params(request: Txt2ImgRequest, model: ModelSpec, img2img: bool, hires: bool
                           ) -> dict[str, object]:
    """A1111's schedule and noise-level options as its samplers write them: each where it acted on a pass (the
    sigma range on a schedule that spans one, rho on one that has it, Beta's parameters whenever Beta runs, the
    extra noise on img2img and the hires pass, SGM's multiplier on txt2img's noise), none on diffusers' path."""
    settings = SamplerSettings.of(request)
    passes = [request, hires_request(request)] if hires else [request]
    k_schedules = [resolve(p.sampler, p.schedule_type, model.schedules)[1] for p in passes
                   if SAMPLERS[p.sampler].k_function]
    on_timesteps = [p for p in passes if SAMPLERS[p.sampler].t_function and p.schedule_type == DEFAULT_SCHEDULE]
    a1111 = bool(k_schedules or on_timesteps)
    ranged = any(schedule in RANGED_SCHEDULES for schedule in k_schedules)
    rho = next((DEFAULT_RHO[schedule] for schedule in k_schedules if schedule in DEFAULT_RHO), None)
    beta = "Beta" in k_schedules
    own_discard = all(SAMPLERS[p.sampler].k_options.get("discard_penultimate") for p in passes)
    txt2img_k = not img2img and SAMPLERS[request.sampler].k_function is not None
    return {
        "Schedule min sigma": settings.sigma_min if ranged and settings.sigma_min else None,
        "Schedule max sigma": settings.sigma_max if ranged and settings.sigma_max else None,
        "Schedule rho": settings.rho if rho is not None and settings.rho not in (0, rho) else None,
        "Beta schedule alpha": settings.beta_dist_alpha if beta else None,
        "Beta schedule beta": settings.beta_dist_beta if beta else None,
        "Discard penultimate sigma": True if settings.always_discard_next_to_last_sigma and a1111
        and not own_discard else None,
        "SGM noise multiplier": True if settings.sgm_noise_multiplier and txt2img_k else None,
        "Noise Schedule": settings.sd_noise_schedule if settings.sd_noise_schedule != "Default" and a1111 else None,
        "Downcast alphas_cumprod": True if settings.use_downcasted_alpha_bar and a1111 else None,
        "Extra noise": settings.img2img_extra_noise if settings.img2img_extra_noise and (img2img or hires)
        and a1111 else None,
    }


def soft_inpainting_params(request: Txt2ImgRequest, inpaint: bool) -> dict[str, object]:
    """A1111's Soft Inpainting writes all its settings when it acts (an inpainting request), none otherwise."""
    names = [f.name for f in FIELDS if f.name.startswith("soft_inpainting")]
    acts = inpaint and getattr(request, "soft_inpainting", False)
    return {BY_NAME[name].infotext: getattr(request, name) if acts else None for name in names}


def changed_fields(request: Txt2ImgRequest, model: ModelSpec) -> dict[str, object]:
    """The fields with an infotext key (sdtrt.requests.fields) that differ from the model's default. Those the rules
    in infotexts() write say when and in which words; any other is written from the registry alone, so a field
    added there shows in the infotext, and is read back, with no rule of its own."""
    return {key: getattr(request, name) for key, name in INFOTEXT_FIELDS.items()
            if hasattr(request, name) and getattr(request, name) != model.field(name).default}


def settings_from_infotext(text: str) -> dict[str, object]:
    """Request fields from an A1111 infotext (values as text; validation converts them): the keys the field table
    names, then those that hold more than one field (Size, Seed resize from, Inpaint area). Keys sdtrt does not
    take (ENSD, Lora hashes, ...) are ignored; "Model"/"Model hash" come back under those names."""
    prompt, negative, params = parse_infotext(text)
    settings: dict[str, object] = {"prompt": prompt, "negative_prompt": negative}
    for key, value in params.items():
        if key in INFOTEXT_FIELDS:
            settings[INFOTEXT_FIELDS[key]] = value
    if "Eta DDIM" in params:  # A1111's DDIM, PLMS and DDIM CFG++ write their eta so
        settings["eta"] = params["Eta DDIM"]
    if "Size" in params:
        width, _, height = params["Size"].partition("x")
        settings.update(width=width, height=height)
    if "Hires upscale" in params or "Hires upscaler" in params or "Hires resize" in params:
        settings["enable_hr"] = True
    if "x" in params.get("Hires resize", ""):
        width, _, height = params["Hires resize"].partition("x")
        settings.update(hr_resize_x=width, hr_resize_y=height)
    if "x" in params.get("Seed resize from", ""):
        width, _, height = params["Seed resize from"].partition("x")
        settings.update(seed_resize_from_w=width, seed_resize_from_h=height)
    if settings.get("randn_source") == "GPU":  # A1111's GPU source gives an NVIDIA GPU's numbers: NV here
        settings["randn_source"] = "NV"
    if params.get("Inpaint area") == "Only masked":
        settings["inpaint_full_res"] = True
    if "Face restoration" in params:  # A1111 writes the restorer it ran
        settings.update(restore_faces=True, face_restorer=params["Face restoration"])
    for key in ("Model", "Model hash"):
        if key in params:
            settings[key] = params[key]
    return settings


MAX_N_ITER = 100  # A1111's "Batch count" slider goes to 100; its API takes any number, sdtrt no more than this


def check_n_iter(n_iter: int) -> int:
    """A batch count a request may ask for, checked before any batch runs (each batch is bounded by the spec)."""
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or not 1 <= n_iter <= MAX_N_ITER:
        raise InvalidRequest("n_iter", n_iter, f"an integer from 1 to {MAX_N_ITER} (batches run one after another; "
                                               "for more pictures, send more requests)")
    return n_iter


def batch_count(request: Txt2ImgRequest, n_iter: int) -> Iterator[Txt2ImgRequest]:
    """A1111's "Batch count": n_iter requests one after another, seeds continuing (seed + j * batch_size; with a
    variation seed the seed stays and the variation seed continues). Checked at once, made one at a time."""
    check_n_iter(n_iter)
    step = request.batch_size
    seed_step = 0 if request.subseed_strength > 0 else step  # A1111: with a variation seed, only it moves
    return (replace(request, seed=request.seed + j * seed_step, subseed=request.subseed + j * step)
            for j in range(n_iter))


def one_per_image(request: Txt2ImgRequest) -> list[Txt2ImgRequest]:
    """A batch as single-image requests with the seeds the batch gives each image (seed + i, or the same seed
    with the variation seed + i): the same pictures, one request each."""
    n = request.batch_size
    seeds = image_seeds(request.seed, n, request.subseed_strength > 0)
    return [replace(request, batch_size=1, seed=seed, subseed=subseed)
            for seed, subseed in zip(seeds, image_seeds(request.subseed, n))]


def concatenate(generations: list[Generation]) -> Generation:
    return Generation(
        np.concatenate([g.images for g in generations]),
        [s for g in generations for s in g.seeds],
        [t for g in generations for t in g.infotexts],
    )
