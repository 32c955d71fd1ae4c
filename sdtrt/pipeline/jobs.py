"""The generation jobs, each a short composition of the shared pieces: seeds, a scheduler, the loop, the VAE.

    txt2img:  noise -> denoise -> [hires fix: upscale -> img2img pass]           -> latents for the decoder
    img2img:  init image -> VAE sample -> add noise at the strength -> denoise -> latents for the decoder
    inpaint:  img2img with a mask: blended each step (4-channel U-Nets) or fed to the U-Net (9-channel ones)

Each job consumes every image's generator in the order diffusers' pipelines do (VAE samples, then the noise,
then the step noise), so the same seed gives diffusers' picture. The networks come in through ``Networks``:
onnxruntime sessions in-process, BLS calls to the Triton models when served; the request comes in as its plan
(sdtrt.requests.plan), read once where it arrived, and ``run`` is the one entry both take.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import numpy as np
import torch
from PIL import Image

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.hires import HIRES_UPSCALERS, upscale_image, upscale_latents
from sdtrt.contract.samplers import (SamplerSettings, make_scheduler, resolve, runs_on_a1111_timesteps,
                                    runs_on_k_diffusion)
from sdtrt.contract.seeds import NoiseDraw, image_seeds, initial_noise, make_generators
from sdtrt.contract.spec import ModelSpec
from sdtrt.pipeline.conditioning import (CONTEXT_INPUT, TEXT_LENGTH, Conditioning, ControlledUNet,
                                         ScheduledConditioning, scheduled_conditioning, unet_conditioning)
from sdtrt.pipeline.denoise import Guidance, Inpainting, Pass, UNet, denoise, prepare_latents, strength_timesteps
from sdtrt.pipeline.ksampling import KSchedule, NvStepNoise
from sdtrt.pipeline.soft_inpainting import SoftInpainting
from sdtrt.pipeline.timesteps import TRAINING_STEPS, TSchedule
from sdtrt.pipeline.vae import sample_latents
from sdtrt.requests.img2img import LATENT_FILLS, ImageInputs, finish_images, to_model_input
from sdtrt.postprocessing.faces import FaceNetworks, restore_faces
from sdtrt.postprocessing.model_upscale import ModelUpscaler, upscale_to
from sdtrt.requests.hypertile import HypertileNetworks, hypertiled
from sdtrt.requests.plan import Plan, TextPair
from sdtrt.requests.request import Txt2ImgRequest, face_restorer, hires_request, hires_target, request_tiling

OnStep = Callable[[int, int, torch.Tensor], None]  # (steps done, steps, latents now)
Stage = Callable[[str], ContextManager]  # times (and, served, batches) one stage: "text", "denoise", "decode"


class Networks(Protocol):
    unet: UNet
    device: torch.device  # where the loop keeps its tensors: the U-Net's inputs and outputs live there

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> latent distribution parameters [N, 2C, H/8, W/8]."""

    def vae_decode(self, latents: torch.Tensor, hypertile: torch.Tensor | None = None) -> np.ndarray:
        """Latents already divided by the VAE scaling factor -> uint8 pictures [N, H, W, 3] (``hypertile``: the
        tiles of the decoder's Hypertile variant, sdtrt.requests.hypertile)."""

    def upscaler(self, name: str) -> ModelUpscaler:
        """A registered upscaler model (the spec's ``upscalers``) with its network to run."""

    def face_networks(self, restorer: str, weight: float) -> FaceNetworks:
        """The face detector, parser and a registered restorer (the spec's ``face_restorers``) to run."""

    def encode_texts(self, texts: TextPair, clip_skip: int, clip_l_skip: bool = False
                     ) -> tuple[Conditioning, Conditioning]:
        """(uncond, cond) of a plan's text pair: its negative prompt's pieces and its prompt's."""

    def controlnet(self, network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A registered ControlNet's residuals (the spec's ``controlnets``), its inputs by name."""


def _no_stage(name: str) -> ContextManager:
    return contextlib.nullcontext()


def run(plan: Plan, nets: Networks, on_step: OnStep | None = None, stage: Stage = _no_stage,
        others: Callable[[Plan], Networks] | None = None) -> tuple[np.ndarray, list[int]]:
    """A plan, run: its texts encoded, its passes denoised, its latents decoded -> (uint8 pictures, each one's
    seed). The served job models and the in-process runner both run requests through here; ``others`` gives the
    networks of a model taking over part of the request (the plan's refiner or hires checkpoint)."""
    nets = hypertiled(plan, nets)
    with stage("text"):
        prompts = encode_prompts(plan, nets)
        takeover = _takeover(plan, others)
    with stage("denoise"):
        job = img2img_latents if plan.img2img else txt2img_latents
        latents = job(plan, prompts, nets, on_step, takeover)
    with stage("decode"):
        pictures = (takeover.decoder or nets).vae_decode(latents)
        if plan.request.restore_faces:  # (A1111: before img2img's colour correction and overlay)
            pictures = restore_pictures(pictures, plan, nets)
        if plan.images is not None:
            pictures = finish_images(pictures, plan.images, plan.spec.vae_scale_factor, plan.images.soft_masks)
    return pictures, list(plan.seeds)


def restore_pictures(pictures: np.ndarray, plan: Plan, nets: Networks) -> np.ndarray:
    """A1111's Restore faces on each decoded picture, by the request model's face restorer."""
    request = plan.request
    faces = nets.face_networks(face_restorer(plan.spec, request.face_restorer), request.code_former_weight)
    return np.stack([np.asarray(restore_faces(Image.fromarray(p), faces)) for p in pictures])


@dataclass
class Prompts:
    """A request's conditioning step by step (A1111's prompt editing and alternation, in both prompts): the
    first pass's and, with the hires fix, the second pass's."""

    first: ScheduledConditioning
    hires: ScheduledConditioning | None = None


def encode_prompts(plan: Plan, nets: Networks) -> Prompts:
    """Every text pair the plan's passes use, through the text encoder once each, then each pass's schedule."""
    request = plan.request
    encoded = [nets.encode_texts(texts, request.clip_skip, request.sdxl_clip_l_skip) for texts in plan.texts]
    v0 = bool(plan.request.pad_conds_v0)
    hires = scheduled_conditioning(plan.hires.prompts, encoded, v0) if plan.hires is not None else None
    return Prompts(scheduled_conditioning(plan.first.prompts, encoded, v0), hires)


@dataclass
class Model:
    """Another model's part in a request (A1111's refiner or hires checkpoint): the request planned on it, its
    networks and its conditioning."""

    plan: Plan
    nets: Networks
    prompts: Prompts


@dataclass
class Takeover:
    """The models taking over part of a request, and whose VAE decodes: the last one that ran, as A1111 decodes
    with the checkpoint it has loaded (None: the request's own)."""

    refiner: Model | None = None
    hires: Model | None = None
    decoder: Networks | None = None


def _takeover(plan: Plan, others: Callable[[Plan], Networks] | None) -> Takeover:
    def model(other: Plan | None) -> Model | None:
        if other is None:
            return None
        if others is None:
            raise ValueError(f"the plan names another model ({other.spec.key}) and no networks were given for it")
        nets = others(other)
        return Model(other, nets, encode_prompts(other, nets))

    return Takeover(model(plan.refiner), model(plan.hires_model))


class SwitchingUNet:
    """The U-Net A1111's refiner gives the sampler: the request's model's until the share of sampling done, by
    noise level ((999 - the nearest training timestep) / 1000, A1111's apply_refiner) or with ``calls`` by the
    denoiser's calls so far of that many (its option refiner_switch_by_sample_steps), reaches ``switch_at``, the
    refiner's from then on (A1111 loads it once and stays on it for the pass), each with its own conditioning."""

    def __init__(self, own: UNet, refiner: UNet, switch_at: float, on_switch: Callable[[], None], calls: int = 0,
                 nearest: Callable[[float], int] = round):
        self.own, self.refiner, self.switch_at, self.on_switch = own, refiner, switch_at, on_switch
        self.switched = False
        self.calls, self.called, self.nearest = calls, 0, nearest

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: Conditioning) -> torch.Tensor:
        if self.calls:
            done = self.called / self.calls
        else:
            done = (TRAINING_STEPS - 1 - self.nearest(float(timestep.reshape(-1).max()))) / TRAINING_STEPS
        self.called += 1
        if not self.switched and done >= self.switch_at:
            self.switched = True
            self.on_switch()
        if self.switched:
            return self.refiner(sample, timestep, {k[len(REFINER):]: v for k, v in context.items()
                                                   if k.startswith(REFINER)})
        return self.own(sample, timestep, {k: v for k, v in context.items() if not k.startswith(REFINER)})


REFINER = "refiner/"  # the refiner's conditioning beside the model's in the loop's context, under this prefix


class TextLengths:
    """A U-Net that takes each row's text at its own length, as A1111 does without "Pad prompt/negative prompt
    to be same length" (its default): rows whose texts have different lengths go through it in separate calls,
    each with its context cut to that length, instead of one call with the shorter text padded by empty chunks."""

    def __init__(self, unet: UNet):
        self.unet = unet

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: Conditioning) -> torch.Tensor:
        lengths = context.get(TEXT_LENGTH)
        if lengths is None or bool((lengths == context[CONTEXT_INPUT].shape[1]).all()):
            return self.unet(sample, timestep, context)
        out: torch.Tensor | None = None
        # A1111's order: the conds' length (their rows come last), then the uncond's (which Hypertile's draws follow)
        for length in dict.fromkeys(reversed(lengths.tolist())):
            rows = (lengths == length).nonzero().flatten().to(sample.device)
            part = {k: v[rows.to(v.device)][:, :length] if k == CONTEXT_INPUT else v[rows.to(v.device)]
                    for k, v in context.items()}
            answer = self.unet(sample[rows], timestep[rows], part)
            if out is None:
                out = answer.new_empty((sample.shape[0], *answer.shape[1:]))
            out[rows] = answer
        return out


def model_unet(plan: Plan, nets: Networks, control: ControlledUNet | None = None) -> UNet:
    """A model's U-Net as the request takes its texts: padded to one length, or each at its own; steered by the
    request's ControlNet units where it has some (``control``)."""
    padded = plan.request.pad_conds and not plan.request.pad_conds_v0  # (v0's lengths: A1111 tries it first)
    unet = nets.unet if control is None else control
    return unet if padded else TextLengths(unet)


def _control(plan: Plan, nets: Networks, size: tuple[int, int], run: Pass,
             context: Callable[[int], Conditioning], second_pass: bool = False
             ) -> tuple[ControlledUNet | None, Callable[[int], Conditioning]]:
    """The pass's ControlNet units around the model's U-Net (None without units), and its conditioning noting the
    steps they follow; the pass's steps are its sampler's (a k-diffusion sampler's launch steps, else the
    scheduler's timesteps it runs). With the hires fix, each unit steers the passes its hr_option names."""
    hires = None if plan.hires is None else second_pass
    units = tuple(unit for unit in plan.controls if unit.steers(hires))
    if not units:
        return None, context
    steps = getattr(run.scheduler, "launch_steps", None) or len(run.scheduler.timesteps if run.timesteps is None
                                                                 else run.timesteps)
    control = ControlledUNet(nets.unet, nets, plan.spec, units, size, steps)
    return control, control.steered(context)


def _with_refiner(plan: Plan, takeover: Takeover, first_pass: bool, unet: UNet,
                  context: Callable[[int], Conditioning], size: tuple[int, int], with_uncond: bool,
                  run: Pass) -> tuple[UNet, Callable[[int], Conditioning]]:
    """The pass's U-Net and conditioning, with the refiner's where it may take over in this pass (``run``: the
    pass, its schedule set)."""
    refiner = takeover.refiner
    if refiner is None or not plan.refines(first_pass):
        return unet, context
    prompts = refiner.prompts.first if first_pass else refiner.prompts.hires
    theirs = step_contexts(refiner.plan.spec, prompts, plan.request, with_uncond, size, refiner.nets.device)
    # A1111's CFG denoiser's total_steps: its sampler's launch steps (a diffusers class: its U-Net calls)
    calls = getattr(run.scheduler, "launch_steps", None) or len(run.scheduler.timesteps if run.timesteps is None
                                                                 else run.timesteps)

    def switched() -> None:
        takeover.decoder = refiner.nets

    def both(step: int) -> Conditioning:
        return {**context(step), **{REFINER + k: v for k, v in theirs(step).items()}}

    return SwitchingUNet(unet, model_unet(plan, refiner.nets), plan.request.refiner_switch_at, switched,
                         calls if plan.request.refiner_switch_by_steps else 0,
                         getattr(run.scheduler, "nearest_timestep", round)), both


def step_contexts(spec: ModelSpec, prompts: ScheduledConditioning, request: Txt2ImgRequest, with_uncond: bool,
                  size: tuple[int, int], device: torch.device) -> Callable[[int], Conditioning]:
    """The U-Net's conditioning for each 0-based step of the request's images at ``size``, built once per
    schedule entry."""
    built: dict[int, Conditioning] = {}
    crop = (request.sdxl_crop_top, request.sdxl_crop_left)

    def at(step: int) -> Conditioning:
        index = prompts.index(step)
        if index not in built:
            _, uncond, conds = prompts.entries[index]
            built[index] = unet_conditioning(spec, uncond, conds, request.batch_size, with_uncond, size, device, crop)
        return built[index]

    return at


def unet_channels(spec: ModelSpec) -> int:
    return int(spec.component("unet").input("sample").shape[1])


def _noise(plan: Plan, generators, width: int, height: int, device: torch.device) -> torch.Tensor:
    """Drawn on the CPU from each image's generator (the seed contract), then moved to the loop's device."""
    spec, request = plan.spec, plan.request
    f = spec.vae_scale_factor
    subseeds = image_seeds(request.subseed, request.batch_size) if request.subseed_strength > 0 else None
    resize = request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
    resize_from = (request.seed_resize_from_h // f, request.seed_resize_from_w // f) if resize else None
    draw = NoiseDraw(list(plan.seeds), subseeds, request.subseed_strength, request.randn_source == "NV", resize_from)
    noise = initial_noise(generators, spec.latent_channels, height // f, width // f, draw)
    return noise.to(device)


def _pass(plan: Plan, request: Txt2ImgRequest | None = None) -> Pass:
    """Fresh per-image generators and a fresh scheduler for one denoising pass (schedulers keep run state): the
    sampler's diffusers class, or its k-diffusion function where A1111's settings or schedule need it.
    ``request``: the pass's view of the plan's request (the hires pass's sampler), by default the request."""
    spec, request, seeds = plan.spec, request or plan.request, list(plan.seeds)
    settings = SamplerSettings.of(request)
    sampler, schedule = resolve(request.sampler, request.schedule_type, spec.schedules)
    if runs_on_a1111_timesteps(request.sampler, schedule, settings):
        scheduler = TSchedule(sampler, spec.scheduler_config, settings, seeds)
    elif runs_on_k_diffusion(request.sampler, schedule, spec.schedules, settings):
        scheduler = KSchedule(sampler, schedule, spec.scheduler_config, settings, seeds, spec.align_your_steps)
    else:
        scheduler = make_scheduler(request.sampler, spec.scheduler_config, request.schedule_type, spec.schedules,
                                   seeds, spec.align_your_steps)
    return Pass(scheduler, make_generators(seeds), eta=settings.eta_for(sampler))


def _step_noise(plan: Plan, run: Pass) -> None:
    """A1111's ENSD: once a pass's starting noise is drawn, its step noise comes from generators seeded with
    seed + delta instead of the seed's own, continued. With the NV source the k-diffusion path draws it from
    the images' NV generators: continued after the starting noise (which "Resize seed from" draws from a generator
    of its own), or ENSD's fresh ones."""
    request, delta = plan.request, plan.request.eta_noise_seed_delta
    if delta:
        run.generators[:] = make_generators([seed + delta for seed in plan.seeds])
    if request.randn_source == "NV" and isinstance(run.scheduler, (KSchedule, TSchedule)):
        resized = request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
        seeds = [seed + delta for seed in plan.seeds]
        run.scheduler.nv_noise = NvStepNoise(seeds, 0 if delta or resized else 1)


def _guidance(plan: Plan, prompts: ScheduledConditioning, run: Pass) -> Guidance:
    request = plan.request
    cfgpp = isinstance(run.scheduler, TSchedule) and run.scheduler.cfgpp
    return Guidance(request.guidance_scale, prompts.weights, request.guidance_rescale, request.s_min_uncond, cfgpp,
                    bool(request.s_min_uncond_all), request.skip_early_cond or 0.0)


def txt2img_latents(plan: Plan, prompts: Prompts, nets: Networks, on_step: OnStep | None = None,
                    takeover: Takeover | None = None) -> torch.Tensor:
    """A txt2img plan's final latents, divided by the VAE scaling factor."""
    spec, request, first, takeover = plan.spec, plan.request, plan.first, takeover or Takeover()
    if unet_channels(spec) != spec.latent_channels:
        raise InvalidRequest("init_image", None, "an init image and a mask: this is an inpainting model "
                             f"({unet_channels(spec)}-channel U-Net); use img2img")
    if plan.firstpass is not None:  # A1111's firstpass_image: the hires fix starts from a given picture
        return hires_pass(plan, None, prompts.hires, nets, on_step, takeover) / spec.vae_scaling_factor
    run = _pass(plan)
    noise = _noise(plan, run.generators, first.width, first.height, nets.device)
    _step_noise(plan, run)
    latents = prepare_latents(run.scheduler, noise, first.steps)
    guidance = _guidance(plan, prompts.first, run)
    context = step_contexts(spec, prompts.first, request, guidance.with_uncond, (first.width, first.height),
                            nets.device)
    control, context = _control(plan, nets, (first.width, first.height), run, context)
    unet, context = _with_refiner(plan, takeover, True, model_unet(plan, nets, control), context,
                                  (first.width, first.height), guidance.with_uncond, run)
    latents = denoise(run, unet, latents, context, guidance, on_step)
    if plan.hires is not None:
        latents = hires_pass(plan, latents, prompts.hires, nets, on_step, takeover)
    return latents / spec.vae_scaling_factor


def hires_pass(plan: Plan, latents: torch.Tensor | None, prompts: ScheduledConditioning, nets: Networks,
               on_step: OnStep | None, takeover: Takeover | None = None) -> torch.Tensor:
    """Upscale the first pass and redraw it: an img2img pass with fresh generators from the same seeds (as A1111
    re-seeds its second pass), ``hr_second_pass_steps`` steps and the denoising strength, conditioned on the
    upscaled size (SDXL's time ids, as A1111 sends them); on the hires checkpoint where one is named (the first
    pass decoded by the request's model, encoded by that one, as A1111 swaps models between the passes).
    ``latents`` None: the first pass is the plan's picture (A1111's firstpass_image)."""
    spec, request, second, takeover = plan.spec, plan.request, plan.hires, takeover or Takeover()
    # A1111 decodes the first pass with the model it ended on (the refiner, where it took over), then reloads the
    # request's checkpoint (or the hires one) for the second pass
    runner, first_decoder, takeover.decoder = nets, takeover.decoder or nets, None
    if takeover.hires is not None:
        runner, prompts, takeover.decoder = takeover.hires.nets, takeover.hires.prompts.hires, takeover.hires.nets
    upscaler = HIRES_UPSCALERS.get(request.hr_upscaler)  # None: an upscaler model of the export's
    f, width, height = spec.vae_scale_factor, second.width, second.height
    size = hires_target(request, spec)  # the upscale, then (A1111's "Resize width/height to") its crop
    up_width, up_height = size.upscale
    run = _pass(plan, hires_request(request))
    generators, scheduler = run.generators, run.scheduler
    latent = upscaler is not None and upscaler.latent_mode is not None
    if latents is None and latent:  # A1111 encodes the picture with the request's model
        picture = to_model_input([Image.fromarray(plan.firstpass)] * request.batch_size, f).to(nets.device)
        latents = sample_latents(nets.vae_encode(picture), make_generators(plan.seeds), spec.vae_scaling_factor)
    if latent:
        init = upscale_latents(latents, upscaler, up_width // f, up_height // f)
    else:
        pictures = [plan.firstpass] * request.batch_size if latents is None else \
            first_decoder.vae_decode(latents / spec.vae_scaling_factor)
        resized = [_upscaled(Image.fromarray(p), request, nets, (up_width, up_height)) for p in pictures]
        init = sample_latents(runner.vae_encode(to_model_input(resized, f)), generators, spec.vae_scaling_factor)
    init = size.crop(init, f)
    timesteps = strength_timesteps(scheduler, second.steps, request.denoising_strength, init.device,
                                   second_pass=True)
    if len(timesteps) == 0:
        return init
    noise = _noise(plan, generators, width, height, init.device)
    _step_noise(plan, run)
    latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(request.batch_size))
    if request.img2img_extra_noise > 0:  # (only A1111's code paths take it)
        latents = latents + scheduler.extra_noise(noise)
    guidance = _guidance(plan, prompts, run)
    if isinstance(runner, HypertileNetworks):  # (A1111's Hypertile configures the second pass here)
        runner.draws.before_hires((up_width, up_height))
    runner_spec = takeover.hires.plan.spec if takeover.hires is not None else spec  # (its SDXL time ids)
    context = step_contexts(runner_spec, prompts, request, guidance.with_uncond, (width, height), nets.device)
    run.timesteps = timesteps
    control = None
    if runner is nets:  # (the units steer the request's own model: a hires checkpoint has not its ControlNets)
        control, context = _control(plan, nets, (width, height), run, context, second_pass=True)
    unet, context = _with_refiner(plan, takeover, False, model_unet(plan, runner, control), context, (width, height),
                                  guidance.with_uncond, run)
    return denoise(run, unet, latents, context, guidance, on_step)


def _upscaled(picture: Image.Image, request: Txt2ImgRequest, nets: Networks, size: tuple[int, int]) -> Image.Image:
    """The first pass's picture at the hires fix's upscaled size: PIL's resize, or an upscaler model tiled as
    A1111 tiles it (its ESRGAN_tile, DAT_tile and SWIN_tile options: the request's tiling fields)."""
    upscaler = HIRES_UPSCALERS.get(request.hr_upscaler)
    if upscaler is not None:
        return upscale_image(picture, upscaler, *size)
    return upscale_to(picture, nets.upscaler(request.hr_upscaler), *size, request_tiling(request))


def _latent_mask(inputs: ImageInputs, size: tuple[int, int]) -> torch.Tensor:
    """The mask the latents blend by, at their ``size``: A1111's latent mask where the request asks for it
    (its own picture, or the mask unrounded), else the binarized mask's cells."""
    if inputs.blend is not None:
        return inputs.blend
    return torch.nn.functional.interpolate(inputs.mask, size=size)


def _fill_latents(latents: torch.Tensor, cells: torch.Tensor, noise: torch.Tensor, fill: str) -> torch.Tensor:
    """A1111's latent "Masked content": the masked latent cells start from the seed's noise ("latent noise") or
    from zeros ("latent nothing") instead of the picture's latents, by the latent mask."""
    replacement = noise if fill == "latent noise" else torch.zeros_like(latents)
    return latents * (1 - cells) + replacement * cells


def img2img_latents(plan: Plan, prompts: Prompts, nets: Networks, on_step: OnStep | None = None,
                    takeover: Takeover | None = None) -> torch.Tensor:
    """img2img (no mask) or inpainting (mask): the plan's final latents, divided by the VAE scaling factor."""
    takeover = takeover or Takeover()
    spec, request, n = plan.spec, plan.request, plan.request.batch_size
    run = _pass(plan)
    generators, scheduler = run.generators, run.scheduler
    timesteps = run.timesteps = strength_timesteps(scheduler, request.steps, request.denoising_strength, nets.device,
                                                   fix_steps=bool(request.img2img_fix_steps))
    inputs = plan.images.to(nets.device)
    inpaint = inputs.mask is not None
    nine = unet_channels(spec) == spec.latent_channels * 2 + 1
    if nine and not inpaint:
        raise InvalidRequest("mask", None, "a mask: this is an inpainting model (9-channel U-Net)")
    full_strength = request.denoising_strength == 1.0
    soft = SoftInpainting.of(request) if inpaint else None
    if soft is not None and (nine or not isinstance(scheduler, (KSchedule, TSchedule))):
        raise InvalidRequest("soft_inpainting", True, "a sampler on A1111's code path (k_diffusion on, a "
                             "k-diffusion or A1111 timestep sampler) and an ordinary U-Net, as A1111's Soft "
                             "Inpainting blends in its sampler's denoiser")

    image_latents = None  # diffusers skips this VAE sample only for 9-channel inpainting at full strength
    if not (inpaint and nine and full_strength):
        image_latents = sample_latents(nets.vae_encode(inputs.init), generators, spec.vae_scaling_factor)
    noise = _noise(plan, generators, request.width, request.height, nets.device)
    _step_noise(plan, run)
    if inpaint and image_latents is not None and request.inpainting_fill in LATENT_FILLS:
        cells = _latent_mask(inputs, image_latents.shape[-2:])
        image_latents = _fill_latents(image_latents, cells if inputs.blend is not None else cells.round(), noise,
                                      request.inpainting_fill)
    start = noise * request.initial_noise_multiplier  # A1111's "Noise multiplier": the starting noise only
    if len(timesteps) == 0:  # strength 0: the init image's VAE round trip
        latents = image_latents
    elif inpaint and full_strength:
        latents = start * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, start, timesteps[:1].repeat(n))
    if len(timesteps) and request.img2img_extra_noise > 0:  # (only A1111's code paths take it)
        latents = latents + scheduler.extra_noise(start)

    unet_extra = after_step = keep = None
    if inpaint:
        h, w = latents.shape[-2:]
        mask = _latent_mask(inputs, (h, w)).repeat(n, 1, 1, 1)
        masked = sample_latents(nets.vae_encode(inputs.masked), generators, spec.vae_scaling_factor)
        if nine:  # the inpainting U-Net's hint: the binarized mask
            hint = torch.nn.functional.interpolate(inputs.mask, size=(h, w)).repeat(n, 1, 1, 1)
            unet_extra = torch.cat([hint, masked], dim=1)
        else:
            def after_step(i: int, current: torch.Tensor) -> torch.Tensor:
                proper = image_latents
                if i < len(timesteps) - 1:  # re-noise the original to the next step's level
                    proper = scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
                return (1 - mask) * proper + mask * current

            keep = (image_latents, mask)

    guidance = _guidance(plan, prompts.first, run)
    context = step_contexts(spec, prompts.first, request, guidance.with_uncond, (request.width, request.height),
                            nets.device)
    control, context = _control(plan, nets, (request.width, request.height), run, context)
    unet, context = _with_refiner(plan, takeover, True, model_unet(plan, nets, control), context,
                                  (request.width, request.height), guidance.with_uncond, run)
    latents = denoise(run, unet, latents, context, guidance, on_step, Inpainting(unet_extra, after_step, keep, soft))
    if soft is not None:  # (read once the pictures are decoded: finish_images)
        plan.images.soft_masks = soft.overlay_masks(keep[1], image_latents, latents, (request.width, request.height))
    return latents / spec.vae_scaling_factor
