"""A request parsed once: the plan every later step runs from.

``plan_request`` checks a request against its model's spec and reads its prompts once, into what the loop, the
tokenizer and the infotext need: the LoRAs its tags name, the embeddings it writes, the texts the text encoder
runs (each A1111-weighted, extra-network tags taken out), which of them condition each step of each pass, and the
passes' sizes and steps. The job models and the in-process runner build the plan where the request arrives and
run it with one ``sdtrt.pipeline.jobs.run(plan, networks)``; the tokenizer model receives a text's weighted
pieces, not the prompt to parse again.

A client checks a request with ``validate`` before sending it (an error without a round trip); a server trusts
no client, so the job model plans what it receives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from sdtrt.contract.errors import InvalidRequest
from sdtrt.contract.seeds import image_seeds
from sdtrt.contract.spec import LORA_RANK, MAX_CONTROLNET_UNITS, UNET_BATCH, ModelSpec, controlnet_image, controlnet_mask
from sdtrt.requests.controlnet import PlannedUnit, check_units, plan_units
from sdtrt.requests.hypertile import check_hypertile_loras
from sdtrt.requests.extra_networks import LoraTag, request_loras, strip_extra_networks, used_embeddings
from sdtrt.requests.prompt_schedule import composable_prompts, prompt_schedule, text_at
from sdtrt.requests.prompts import COMMA_BACKTRACK, Pieces, emphasis_pieces
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest, check_fields, hires_target, resolve_seeds

if TYPE_CHECKING:  # (the pictures are prepared with diffusers, only where a plan with pictures is made)
    from sdtrt.requests.img2img import ImageInputs


@dataclass(frozen=True)
class TextPair:
    """One text-encoder call: a prompt and a negative prompt as the tokenizer takes them (weighted pieces, tags
    removed), encoded side by side and padded to the same number of chunks."""

    prompt: Pieces
    negative: Pieces
    normalize: bool = True  # each chunk's mean restored after weighting (A1111's emphasis but "No norm")
    backtrack: int = COMMA_BACKTRACK  # a full chunk is cut at a comma this near its end (comma_padding_backtrack)


@dataclass(frozen=True)
class PromptSchedule:
    """Which texts condition each step of one pass (A1111's prompt editing and alternation, in both prompts):
    entries (last 0-based step, the index in ``Plan.texts`` of each AND subprompt's pair) in step order, and each
    subprompt's weight (composable diffusion; one subprompt of weight 1 for a plain prompt)."""

    entries: tuple[tuple[int, tuple[int, ...]], ...]
    weights: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class PassPlan:
    """One denoising pass: its size, the scheduler's steps, and its conditioning."""

    width: int
    height: int
    steps: int
    prompts: PromptSchedule


@dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    request: Txt2ImgRequest  # checked, the model's defaults filled in, -1 seeds picked
    seeds: tuple[int, ...]  # each image's
    loras: tuple[LoraTag, ...]  # the prompt's tags, then the negative prompt's (as A1111 activates both)
    embeddings: tuple[str, ...]  # the registered embeddings the prompts write (the infotext's "TI hashes")
    texts: tuple[TextPair, ...]  # every pair the text encoder runs, once each, whichever pass needs it
    first: PassPlan
    hires: PassPlan | None = None  # txt2img's hires fix: the second pass, at the upscaled size
    images: "ImageInputs | None" = None  # img2img's picture and mask, prepared at the request's size
    # Other models of the server taking over part of the request, each the request planned on that model
    refiner: "Plan | None" = None  # A1111's refiner: takes over the sampling at refiner_switch_at
    hires_model: "Plan | None" = None  # A1111's hires checkpoint: runs the hires fix's second pass
    firstpass: np.ndarray | None = None  # A1111's firstpass_image: [H, W, 3] uint8, the hires fix starts from it
    controls: tuple[PlannedUnit, ...] = ()  # the enabled ControlNet units, their control maps made

    def refines(self, first_pass: bool) -> bool:
        """Whether the refiner may take over in the first pass or the hires fix's second (A1111's apply_refiner:
        without the hires fix in the only pass, with it as hires_fix_refiner_pass says)."""
        if self.refiner is None:
            return False
        if self.hires is None:
            return first_pass
        mode = self.request.hires_refiner_pass
        return mode == "both passes" or (mode == "first pass") == first_pass

    @property
    def img2img(self) -> bool:
        return isinstance(self.request, Img2ImgRequest)

    @property
    def inpaint(self) -> bool:
        return self.images is not None and self.images.mask is not None

    @property
    def lora_names(self) -> list[str]:
        """The registered LoRAs the prompts name, each once, in order."""
        return list(dict.fromkeys(tag.name for tag in self.loras))


@dataclass(frozen=True)
class _Prompts:
    """What a request's prompts say, read once: its LoRAs, its subprompts and the weighted pieces of each text."""

    loras: tuple[LoraTag, ...]
    subprompts: dict[str, tuple[tuple[str, float], ...]]  # a pass's prompt -> its AND subprompts and weights
    pieces: dict[str, Pieces]  # a schedule's text (tags still in) -> its pieces (tags out)
    normalize: bool = True  # (TextPair.normalize)
    backtrack: int = COMMA_BACKTRACK  # (TextPair.backtrack)


def _read_prompts(request: Txt2ImgRequest, spec: ModelSpec, passes: list[_Pass]) -> _Prompts:
    """The prompts' LoRAs (registered, their rank within the export's), each pass's subprompts (their U-Net rows
    within one call) and, for every text some step of ``passes`` sees, its weighted pieces."""
    rank = spec.dims[LORA_RANK].max if LORA_RANK in spec.dims else 0
    loras = tuple(request_loras(request.prompt, request.negative_prompt, spec.loras, rank))
    pieces: dict[str, Pieces] = {}
    subprompts = {}
    for one in passes:
        if (one.prompt, one.negative) != (request.prompt, request.negative_prompt):  # the hires fix's own prompts
            if tuple(request_loras(one.prompt, one.negative, spec.loras, rank)) != loras:
                raise InvalidRequest("hr_prompt", one.prompt, "a hires prompt with the same LoRA tags as the prompt "
                                     "(sdtrt runs one request's LoRAs in both passes)")
        subprompts[one.prompt] = tuple(composable_prompts(one.prompt))
        check_subprompts(request, spec, len(subprompts[one.prompt]),
                         "prompt" if one.prompt == request.prompt else "hr_prompt")
        texts = (("prompt", [text for text, _ in subprompts[one.prompt]]), ("negative_prompt", [one.negative]))
        for field, parts in texts:
            for text in parts:
                for _, scheduled in prompt_schedule(text, one.steps, one.first_steps):
                    if scheduled not in pieces:
                        pieces[scheduled] = emphasis_pieces(strip_extra_networks(scheduled), field,
                                                            request.emphasis)
    return _Prompts(loras, subprompts, pieces, request.emphasis != "No norm", request.comma_padding_backtrack)


def check_subprompts(request: Txt2ImgRequest, spec: ModelSpec, subprompts: int, field: str = "prompt") -> None:
    """A1111's AND (composable diffusion) runs each subprompt as its own U-Net rows beside the uncond's: the
    images times (subprompts + 1) must fit one U-Net call of this model."""
    most = spec.dims[UNET_BATCH].max
    if subprompts > 1 and request.batch_size * (subprompts + 1) > most:
        raise InvalidRequest(field, getattr(request, field),
                             f"at most {most // request.batch_size - 1} AND subprompts at batch size "
                             f"{request.batch_size} (each image's subprompts and uncond run as one U-Net call of at "
                             f"most {most} rows here); this prompt has {subprompts}")


@dataclass(frozen=True)
class _Pass:
    width: int
    height: int
    steps: int
    first_steps: int | None  # the first pass's steps, for the hires pass (its prompt schedule counts on from them)
    prompt: str
    negative: str


def _passes(request: Txt2ImgRequest, spec: ModelSpec) -> list[_Pass]:
    """Each pass's size, steps and prompts: the first, then the hires fix's (its own prompts where given)."""
    passes = [_Pass(request.width, request.height, request.steps, None, request.prompt, request.negative_prompt)]
    if request.enable_hr and not isinstance(request, Img2ImgRequest):  # the second pass counts on from the first
        width, height = hires_target(request, spec).final
        passes.append(_Pass(width, height, request.hr_second_pass_steps or request.steps, request.steps,
                            request.hr_prompt or request.prompt, request.hr_negative_prompt or request.negative_prompt))
    return passes


def validate(request: Txt2ImgRequest, spec: ModelSpec) -> Txt2ImgRequest:
    """A copy of the request with defaults filled in from the spec and every field checked, its prompts included
    (LoRA tags, AND subprompts, brackets): what a client checks before sending."""
    checked = check_fields(request, spec)
    check_hypertile_loras(checked, _read_prompts(checked, spec, _passes(checked, spec)).loras)
    check_units(checked.controlnet_units, spec)
    return checked


Specs = Callable[[str], ModelSpec]  # another model of the server by name (the catalog's)


def plan_request(request: Txt2ImgRequest, spec: ModelSpec, init_image: np.ndarray | None = None,
                 mask: np.ndarray | None = None, others: Specs | None = None,
                 latent_mask: np.ndarray | None = None, firstpass_image: np.ndarray | None = None,
                 control_pictures: dict[str, np.ndarray | None] | None = None) -> Plan:
    """The request checked, its seeds picked and its prompts read, once; img2img's picture (and masks) prepared;
    a refiner or hires checkpoint planned on its own model (``others``); txt2img's first pass given as a
    picture (``firstpass_image``, with the hires fix); the ControlNet units' maps made from their pictures
    (``control_pictures``, by job input name; an img2img unit without one takes the init image, as A1111's does)."""
    checked = resolve_seeds(check_fields(request, spec))
    passes = _passes(checked, spec)
    prompts = _read_prompts(checked, spec, passes)
    check_hypertile_loras(checked, prompts.loras)
    texts: dict[TextPair, int] = {}
    planned = [PassPlan(one.width, one.height, one.steps, _schedule(one, prompts, texts)) for one in passes]
    images = None
    if isinstance(checked, Img2ImgRequest):
        # diffusers' image processor only where pictures are prepared: a client-only install has none
        from sdtrt.requests.img2img import prepare_images

        images = prepare_images(init_image, mask, checked, spec.vae_scale_factor, latent_mask)
    seeds = tuple(image_seeds(checked.seed, checked.batch_size, checked.subseed_strength > 0))
    embeddings = tuple(used_embeddings("\n".join(f"{one.prompt}\n{one.negative}" for one in passes), spec.embeddings))
    takeover = {}
    for field, name in (("refiner", "refiner_checkpoint"), ("hires_model", "hr_checkpoint")):
        other = _other_model(checked, spec, name, others)
        if other is not None and (field == "refiner" or len(planned) > 1):
            # its own plan takes over no further (and the ControlNets are the request's model's)
            alone = replace(checked, refiner_checkpoint="", hr_checkpoint="", controlnet_units="")
            takeover[field] = plan_request(alone, other, init_image, mask, latent_mask=latent_mask)
    firstpass = _first_pass_picture(firstpass_image, checked, len(planned) > 1)
    controls = _controls(checked, spec, control_pictures or {}, init_image)
    return Plan(spec, checked, seeds, prompts.loras, embeddings, tuple(texts), planned[0],
                planned[1] if len(planned) > 1 else None, images, **takeover, firstpass=firstpass, controls=controls)


def _controls(request: Txt2ImgRequest, spec: ModelSpec, pictures: dict[str, np.ndarray | None],
              init_image: np.ndarray | None) -> tuple[PlannedUnit, ...]:
    if not request.controlnet_units:
        return ()
    own = [pictures.get(controlnet_image(i)) for i in range(MAX_CONTROLNET_UNITS)]
    if isinstance(request, Img2ImgRequest) and init_image is not None:
        own = [init_image if p is None else p for p in own]
    masks = [pictures.get(controlnet_mask(i)) for i in range(MAX_CONTROLNET_UNITS)]
    return plan_units(request.controlnet_units, spec, own, masks, (request.width, request.height))


def _first_pass_picture(picture: np.ndarray | None, request: Txt2ImgRequest, hires: bool) -> np.ndarray | None:
    """A1111's firstpass_image, checked: an RGB picture of the request's size, for a hires fix to start from."""
    if picture is None:
        return None
    size = f"{request.width}x{request.height}"
    if not hires:
        raise InvalidRequest("firstpass_image", "<a picture>", "sent with enable_hr (the hires fix starts from it)")
    picture = np.asarray(picture)
    if picture.dtype != np.uint8 or picture.shape != (request.height, request.width, 3):
        raise InvalidRequest("firstpass_image", f"<{picture.dtype} array of shape {list(picture.shape)}>",
                             f"a {size} RGB uint8 picture (the first pass's size, width x height)")
    return picture


# What another model must share with the request's to take over its latents mid-way (A1111 swaps the weights and
# keeps sampling): the latent space, the U-Net's inputs, the noise schedule and what the U-Net predicts.
_SHARED = ("latent_channels", "vae_scale_factor", "vae_scaling_factor")
_SHARED_SCHEDULE = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type")


def _other_model(request: Txt2ImgRequest, spec: ModelSpec, field: str, others: Specs | None) -> ModelSpec | None:
    """The model a refiner or hires checkpoint field names, checked to fit; None for none or the request's own
    (A1111 does not switch to the checkpoint it runs)."""
    name = getattr(request, field)
    if name in ("", spec.key):
        return None
    if others is None:
        raise InvalidRequest(field, name, "'' here: only a server's job, which has its models, runs another one")
    try:
        other = others(name)
    except InvalidRequest as exc:
        raise InvalidRequest(field, name, exc.allowed) from None
    mine, theirs = spec.component("unet").input("sample").shape[1], other.component("unet").input("sample").shape[1]
    differs = [k for k in _SHARED if getattr(spec, k) != getattr(other, k)]
    differs += [k for k in _SHARED_SCHEDULE if spec.scheduler_config.get(k) != other.scheduler_config.get(k)]
    if mine != theirs:
        differs.append("U-Net input channels")
    if differs:
        raise InvalidRequest(field, name, f"a model in {spec.key!r}'s latent space with its noise schedule "
                                          f"({other.key!r} differs in {', '.join(differs)})")
    return other


def _schedule(one: _Pass, prompts: _Prompts, texts: dict[TextPair, int]) -> PromptSchedule:
    """The subprompts' schedules and the negative prompt's over one pass, merged: at each step where any text
    changes, the pair (subprompt's text, negative's text) of each subprompt, numbered in ``texts``."""
    subprompts = prompts.subprompts[one.prompt]
    positives = [prompt_schedule(text, one.steps, one.first_steps) for text, _ in subprompts]
    negative = prompt_schedule(one.negative, one.steps, one.first_steps)
    entries = []
    for last in sorted({step for schedule in positives + [negative] for step, _ in schedule}):
        indices = []
        for positive in positives:
            pair = TextPair(prompts.pieces[text_at(positive, last)], prompts.pieces[text_at(negative, last)],
                            prompts.normalize, prompts.backtrack)
            indices.append(texts.setdefault(pair, len(texts)))
        entries.append((last, tuple(indices)))
    return PromptSchedule(tuple(entries), tuple(weight for _, weight in subprompts))

