"""Every request field, declared once: its wire dtype, default, limits (fixed, or from the model's export), help,
and what it is called elsewhere (A1111's JSON name and infotext key, the page's label, the CLI flag).

Everything else is generated from this table: the request dataclasses (request.py), the spec's request table
written at export (and with it validation, the Triton inputs of config.pbtxt and the job models' input lists),
the CLI's flags, the gateway's A1111 schema and translation of the fields it takes as they are, the page's
controls and labels, reading an infotext back, and the field table in docs/serving.md
(``scripts/field_table.py``; tests/test_fields.py keeps it current). A new field is one entry here, plus the code
that acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

from sdtrt.contract.hires import DEFAULT_UPSCALER, HIRES_UPSCALERS
from sdtrt.contract.samplers import (DEFAULT_SAMPLER, DEFAULT_SCHEDULE, NOISE_SCHEDULES, SCHEDULE_TYPES,
                                     UNIPC_MAX_ORDER, UNIPC_SKIP_TYPES, UNIPC_VARIANTS, SamplerSettings,
                                     sampler_names)
from sdtrt.contract.seeds import MAX_SEED, RANDOM_SEED
from sdtrt.contract.spec import IMG2IMG, TXT2IMG, FieldSpec
from sdtrt.requests.controlnet import MAX_UNITS_JSON
from sdtrt.requests.img2img import INPAINTING_FILLS, RESIZE_MODES
from sdtrt.contract.hires import DEFAULT_OVERLAP, DEFAULT_TILE, MAX_OVERLAP, MAX_TILE
from sdtrt.requests.prompts import COMMA_BACKTRACK, EMPHASES

MAX_STEPS = 150  # AUTOMATIC1111's slider maximum
RANDN_SOURCES = ("CPU", "NV")
MAX_GUIDANCE = 30.0
BOTH = (TXT2IMG, IMG2IMG)


@dataclass(frozen=True)
class ModelLimits:
    """What one model's export fixes about its requests (sizes, batch, text encoder depth, prompt length)."""

    native_size: int
    min_size: int
    max_size: int
    size_multiple: int
    max_batch: int
    clip_layers: int = 12
    max_prompt_chars: int | None = None
    upscalers: tuple[str, ...] = ()  # the upscaler models registered at export, by name
    face_restorers: tuple[str, ...] = ()  # the face restorers registered at export (GFPGAN, CodeFormer)


# A fixed value, or one read from the model's limits at export.
FromModel = Union[Any, Callable[[ModelLimits], Any]]


@dataclass(frozen=True)
class RequestField:
    name: str  # sdtrt's name: the Triton input, the Python keyword, the spec's key
    dtype: str  # wire dtype: "string", "int64", "int32", "float32", "bool"
    default: FromModel
    help: str
    minimum: FromModel = None
    maximum: FromModel = None
    multiple_of: FromModel = None
    choices: FromModel = None  # (a tuple of strings)
    max_length: FromModel = None
    jobs: tuple[str, ...] = BOTH  # the sdtrt requests that carry it
    shown_in: tuple[str, ...] = BOTH  # the A1111 tabs and API requests that have it (A1111's img2img: no hires fix)
    a1111: str | None = None  # A1111's JSON name (dotted: inside override_settings); None: A1111 has none
    a1111_as_is: bool = False  # the gateway passes A1111's value unchanged (else it translates it in code)
    a1111_default: Any = None  # A1111's API default, for the gateway's schema of the fields taken as they are
    a1111_numbered: bool = False  # A1111's API sends the choice's number (0, 1, ...), in the order of ``choices``
    infotext: str | None = None  # A1111's infotext key, when one key holds just this field's value
    label: str | None = None  # the page's (and A1111's UI) label; None: the page has no control for it
    quicksetting: bool = False  # on the page's top row, for every tab (A1111's quicksettings), not in a tab
    flag: str | None = None  # the CLI flag; None: --name-with-dashes

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def python_type(self) -> type:
        return {"string": str, "bool": bool, "float32": float}.get(self.dtype, int)

    def spec(self, limits: ModelLimits) -> FieldSpec:
        """The field as one model's spec stores it, its model-dependent values read from ``limits``."""
        def value(v: FromModel) -> Any:
            return v(limits) if callable(v) else v

        return FieldSpec(self.name, self.dtype, value(self.default), self.help, minimum=value(self.minimum),
                         maximum=value(self.maximum), multiple_of=value(self.multiple_of), choices=value(self.choices),
                         max_length=value(self.max_length))


def _setting(name: str, dtype: str, help: str, **facts: Any) -> RequestField:
    """A sampler setting: its default is SamplerSettings' (A1111's), defined with the samplers."""
    return RequestField(name, dtype, getattr(SamplerSettings(), name), help, **facts)


def tile_fields(prefix: str, whose: str, option: str) -> list[RequestField]:
    """An upscaler family's tile side and overlap (A1111's options ``option`` and ``option``_overlap)."""
    return [RequestField(f"{prefix}_tile", "int32", DEFAULT_TILE, f"{whose} tile side in pixels; 0 = the whole "
                         f"picture (up to {MAX_TILE}, larger ones tiled at that) (A1111's option {option})",
                         minimum=0, maximum=MAX_TILE, a1111=f"override_settings.{option}"),
            RequestField(f"{prefix}_tile_overlap", "int32", DEFAULT_OVERLAP, f"pixels {whose} tiles overlap "
                         f"(A1111's option {option}_overlap)", minimum=0, maximum=MAX_OVERLAP,
                         a1111=f"override_settings.{option}_overlap")]

def hypertile_fields() -> list[RequestField]:
    """A1111's Hypertile options (extensions-builtin/hypertile), one field each, with its defaults and ranges
    (a swap size of 0 fails in A1111: from 1 here)."""
    doc = "(A1111's option hypertile_{}); needs a model exported with --hypertile"
    fields = [
        RequestField("hypertile_enable_unet", "bool", False, "Hypertile: the U-Net's self-attention layers attend within "
                     "tiles drawn per call " + doc.format("enable_unet"), a1111="override_settings.hypertile_enable_unet"),
        RequestField("hypertile_enable_unet_secondpass", "bool", False, "Hypertile for the hires fix's second pass "
                     + doc.format("enable_unet_secondpass"), shown_in=(TXT2IMG,),
                     a1111="override_settings.hypertile_enable_unet_secondpass"),
        RequestField("hypertile_enable_vae", "bool", False, "Hypertile: the VAE decoder's middle attention attends within "
                     "tiles drawn per image " + doc.format("enable_vae"), a1111="override_settings.hypertile_enable_vae"),
    ]
    for net, tile in (("unet", 256), ("vae", 128)):
        fields += [
            RequestField(f"hypertile_max_depth_{net}", "int32", 3, f"Hypertile: the deepest {net} layers that take "
                         "part (0: the outermost only) " + doc.format(f"max_depth_{net}"), minimum=0, maximum=3,
                         a1111=f"override_settings.hypertile_max_depth_{net}"),
            RequestField(f"hypertile_max_tile_{net}", "int32", tile, f"Hypertile: the {net}'s largest tile side in "
                         "pixels " + doc.format(f"max_tile_{net}"), minimum=0, maximum=512,
                         a1111=f"override_settings.hypertile_max_tile_{net}"),
            RequestField(f"hypertile_swap_size_{net}", "int32", 3, f"Hypertile: how many tile counts the {net} "
                         "draws from " + doc.format(f"swap_size_{net}"), minimum=1, maximum=64,
                         a1111=f"override_settings.hypertile_swap_size_{net}"),
        ]
    return fields

def _size(what: str) -> dict[str, Any]:
    return dict(default=lambda m: m.native_size, minimum=lambda m: m.min_size, maximum=lambda m: m.max_size,
                multiple_of=lambda m: m.size_multiple, help=f"image {what} in pixels")


MAX_MODEL_NAME = 256  # a model's name in the repository (a folder name)
MAX_CROP = 8192  # SDXL's crop coordinates, in pixels (A1111's options take any number)
HIRES_REFINER_PASSES = ("first pass", "second pass", "both passes")  # A1111's hires_fix_refiner_pass

FIELDS: tuple[RequestField, ...] = (
    RequestField("prompt", "string", "", "what to draw", max_length=lambda m: m.max_prompt_chars,
                 a1111="prompt", a1111_as_is=True, a1111_default="", flag="PROMPT"),  # the CLI's positional argument
    RequestField("negative_prompt", "string", "", "what to steer away from", max_length=lambda m: m.max_prompt_chars,
                 a1111="negative_prompt", a1111_as_is=True, a1111_default=""),
    RequestField("seed", "int64", RANDOM_SEED,
                 "seed of image 0; image i uses seed+i (all use seed while a variation seed is on); -1 picks one",
                 minimum=RANDOM_SEED, maximum=MAX_SEED, a1111="seed", a1111_as_is=True, a1111_default=-1,
                 infotext="Seed", label="Seed"),
    RequestField("steps", "int32", 20, "sampling steps", minimum=1, maximum=MAX_STEPS,
                 a1111="steps", a1111_as_is=True, a1111_default=50, infotext="Steps", label="Sampling steps"),
    RequestField("guidance_scale", "float32", 7.0, "classifier-free guidance (CFG) scale; <= 1 turns guidance off",
                 minimum=0.0, maximum=MAX_GUIDANCE, a1111="cfg_scale", a1111_as_is=True, a1111_default=7.0,
                 infotext="CFG scale", label="CFG Scale", flag="--cfg-scale"),
    RequestField("guidance_rescale", "float32", 0.0, "pull the guided prediction's spread back towards the "
                 "prompt's own (diffusers' guidance_rescale; 0 turns it off)", minimum=0.0, maximum=1.0,
                 infotext="Guidance rescale", label="Guidance rescale"),
    RequestField("sampler", "string", DEFAULT_SAMPLER, "AUTOMATIC1111 sampler name", choices=sampler_names(),
                 a1111="sampler_name", infotext="Sampler", label="Sampling method"),
    RequestField("schedule_type", "string", DEFAULT_SCHEDULE,
                 "noise schedule (A1111's 'Schedule type'); Automatic = A1111's choice for the sampler",
                 choices=tuple(SCHEDULE_TYPES), a1111="scheduler", infotext="Schedule type", label="Schedule type"),
    _setting("eta", "float32", "the noise an ancestral, SDE or DDIM sampler adds back at each step; "
             "-1 = A1111's default for the sampler (1, DDIM 0)", minimum=-1.0, maximum=1.0, a1111="eta",
             infotext="Eta"),
    _setting("s_churn", "float32", "sigma churn: noise added before each step of Euler, Heun and DPM2",
             minimum=0.0, maximum=100.0, a1111="s_churn", infotext="Sigma churn"),
    _setting("s_tmin", "float32", "sigma churn only at sigmas at least this", minimum=0.0, maximum=10.0,
             a1111="s_tmin", infotext="Sigma tmin"),
    _setting("s_tmax", "float32", "sigma churn only at sigmas at most this; 0 = no limit", minimum=0.0,
             maximum=999.0, a1111="s_tmax", infotext="Sigma tmax"),
    _setting("s_noise", "float32", "the step noise's multiplier (A1111's sigma noise)", minimum=0.0,
             maximum=1.1, a1111="s_noise", infotext="Sigma noise"),
    _setting("s_min_uncond", "float32", "below this sigma, every other U-Net call skips the negative "
             "prompt (A1111's Negative Guidance minimum sigma; k-diffusion samplers, and DDIM and PLMS by timestep)", minimum=0.0, maximum=15.0,
             a1111="s_min_uncond", infotext="NGMS"),
    RequestField("s_min_uncond_all", "bool", False, "NGMS on every U-Net call below its sigma, not every other one "
                 "(A1111's option 'Negative Guidance minimum sigma all steps')",
                 a1111="override_settings.s_min_uncond_all", infotext="NGMS all steps"),
    RequestField("skip_early_cond", "float32", 0.0, "the share of the first U-Net calls that skip the negative "
                 "prompt (A1111's option 'Ignore negative prompt during early sampling'; its samplers)", minimum=0.0,
                 maximum=1.0, a1111="override_settings.skip_early_cond", infotext="Skip Early CFG"),
    # A1111's schedule and noise-level options: its k-diffusion samplers' (the noise levels and the extra step
    # its timestep samplers' too); a sampler only diffusers runs takes none of them
    _setting("sigma_min", "float32", "the schedule's lowest sigma, for the schedule types that span a range "
             "(Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, Normal, Beta); 0 = the model's",
             minimum=0.0, maximum=1000.0, a1111="override_settings.sigma_min", infotext="Schedule min sigma"),
    _setting("sigma_max", "float32", "the schedule's highest sigma, as sigma_min; 0 = the model's", minimum=0.0,
             maximum=1000.0, a1111="override_settings.sigma_max", infotext="Schedule max sigma"),
    _setting("rho", "float32", "the Karras and Polyexponential schedules' rho; 0 = theirs (7 and 1)",
             minimum=0.0, maximum=100.0, a1111="override_settings.rho", infotext="Schedule rho"),
    _setting("beta_dist_alpha", "float32", "the Beta schedule's alpha (A1111's 'Beta scheduler - alpha')",
             minimum=0.01, maximum=1.0, a1111="override_settings.beta_dist_alpha", infotext="Beta schedule alpha"),
    _setting("beta_dist_beta", "float32", "the Beta schedule's beta (A1111's 'Beta scheduler - beta')",
             minimum=0.01, maximum=1.0, a1111="override_settings.beta_dist_beta", infotext="Beta schedule beta"),
    _setting("use_old_karras_scheduler_sigmas", "bool", "schedules span sigma 0.1 to 10, as A1111 before 1.6 "
             "(its option 'Use old karras scheduler sigmas')",
             a1111="override_settings.use_old_karras_scheduler_sigmas"),
    _setting("always_discard_next_to_last_sigma", "bool", "run a step more and drop the next-to-last sigma, as "
             "DPM2 does (A1111's option; its timestep samplers take the step and drop nothing)",
             a1111="override_settings.always_discard_next_to_last_sigma", infotext="Discard penultimate sigma"),
    _setting("sgm_noise_multiplier", "bool", "txt2img's noise times sqrt(1 + sigma^2) instead of sigma, as SGM's "
             "(SDXL's reference) samplers start (A1111's 'SGM noise multiplier')",
             a1111="override_settings.sgm_noise_multiplier", infotext="SGM noise multiplier"),
    _setting("sd_noise_schedule", "string", "the model's noise levels: as trained, or rescaled to zero terminal "
             "SNR (A1111's 'Noise schedule for sampling', for models trained so)", choices=NOISE_SCHEDULES,
             a1111="override_settings.sd_noise_schedule", infotext="Noise Schedule"),
    _setting("use_downcasted_alpha_bar", "bool", "the noise levels cast to fp16 first, as A1111 before 1.8 "
             "(to reproduce old seeds)", a1111="override_settings.use_downcasted_alpha_bar",
             infotext="Downcast alphas_cumprod"),
    _setting("img2img_extra_noise", "float32", "img2img and the hires pass: the starting noise added once more, "
             "times this (A1111's 'Extra noise multiplier for img2img and hires fix')", minimum=0.0, maximum=1.0,
             a1111="override_settings.img2img_extra_noise", infotext="Extra noise"),
    _setting("unipc_variant", "string", "A1111's UniPC: its update's variant (its option 'UniPC variant'; "
             "vary_coeff is not served)", choices=UNIPC_VARIANTS, a1111="override_settings.uni_pc_variant"),
    _setting("unipc_skip_type", "string", "A1111's UniPC: how its steps are spaced (its option 'UniPC skip type')",
             choices=UNIPC_SKIP_TYPES, a1111="override_settings.uni_pc_skip_type"),
    _setting("unipc_order", "int32", "A1111's UniPC: its order, at most the steps it runs (its option 'UniPC "
             "order')", minimum=1, maximum=UNIPC_MAX_ORDER, a1111="override_settings.uni_pc_order"),
    _setting("unipc_lower_order_final", "bool", "A1111's UniPC: lower orders for the last steps (its option "
             "'UniPC lower order final')", a1111="override_settings.uni_pc_lower_order_final"),
    _setting("eta_noise_seed_delta", "int64", "ENSD: the step noise is drawn from seed + this (A1111's "
             "Eta noise seed delta; NovelAI's 31337)", minimum=0, maximum=MAX_SEED,
             a1111="override_settings.eta_noise_seed_delta", infotext="ENSD"),
    _setting("k_diffusion", "bool", "A1111-exact: run the sampler as A1111 does, with k-diffusion's function "
             "on A1111's sigmas, or DDIM and PLMS with A1111's own on its timesteps (samplers no library has, "
             "schedules a diffusers class cannot follow and the settings above always do)"),
    RequestField("width", "int32", **_size("width"), a1111="width", a1111_as_is=True, a1111_default=512, label="Width"),
    RequestField("height", "int32", **_size("height"), a1111="height", a1111_as_is=True, a1111_default=512,
                 label="Height"),
    RequestField("batch_size", "int32", 1, "images generated together from one prompt", minimum=1,
                 maximum=lambda m: m.max_batch, a1111="batch_size", a1111_as_is=True, a1111_default=1,
                 label="Batch size"),
    RequestField("clip_skip", "int32", 1, "use the output of CLIP's n-th layer from the end (A1111's Clip skip)",
                 minimum=1, maximum=lambda m: min(12, m.clip_layers),
                 a1111="override_settings.CLIP_stop_at_last_layers", infotext="Clip skip", label="Clip skip",
                 quicksetting=True),
    RequestField("sdxl_crop_top", "int32", 0, "SDXL: the crop's top its time ids say the picture was cut at (A1111's "
                 "option 'crop top coordinate')", minimum=0, maximum=MAX_CROP,
                 a1111="override_settings.sdxl_crop_top"),
    RequestField("sdxl_crop_left", "int32", 0, "SDXL: the crop's left, as sdxl_crop_top (A1111's 'crop left "
                 "coordinate')", minimum=0, maximum=MAX_CROP, a1111="override_settings.sdxl_crop_left"),
    RequestField("sdxl_clip_l_skip", "bool", False, "SDXL: Clip skip as A1111 applies it with its option 'Clip skip "
                 "SDXL': CLIP-L's n-th layer from the end, OpenCLIP-G's penultimate (off: both encoders n - 1 below "
                 "the penultimate, as diffusers)", a1111="override_settings.sdxl_clip_l_skip"),
    RequestField("comma_padding_backtrack", "int32", COMMA_BACKTRACK, "a 75-token chunk that fills up within this "
                 "many tokens after a comma is cut at the comma (A1111's option 'Prompt word wrap length limit'; 0: "
                 "never)", minimum=0, maximum=74, a1111="override_settings.comma_padding_backtrack"),
    RequestField("emphasis", "string", "Original", "how (brackets) and [brackets] weigh the words: Original weights "
                 "each 75-token chunk and restores its mean, 'No norm' only weights it, 'Ignore' drops the weights, "
                 "'None' reads brackets as text (A1111's option 'Emphasis mode')", choices=EMPHASES,
                 a1111="override_settings.emphasis", infotext="Emphasis"),
    RequestField("subseed", "int64", RANDOM_SEED, "variation seed of image 0 (image i uses subseed+i); -1 picks one",
                 minimum=RANDOM_SEED, maximum=MAX_SEED, a1111="subseed", a1111_as_is=True, a1111_default=-1,
                 infotext="Variation seed", label="Variation seed"),
    RequestField("subseed_strength", "float32", 0.0, "how far each image's noise moves towards its variation seed's",
                 minimum=0.0, maximum=1.0, a1111="subseed_strength", a1111_as_is=True, a1111_default=0.0,
                 infotext="Variation seed strength", label="Variation strength"),
    RequestField("denoising_strength", "float32", 0.75,
                 "how much of the init image (img2img) or first pass (hires fix) is redrawn", minimum=0.0, maximum=1.0,
                 a1111="denoising_strength", a1111_as_is=True, a1111_default=None, infotext="Denoising strength",
                 label="Denoising strength"),
    RequestField("enable_hr", "bool", False, "hires fix: upscale the first pass and redraw it at the larger size",
                 shown_in=(TXT2IMG,), a1111="enable_hr", a1111_as_is=True, a1111_default=False, label="Hires. fix"),
    RequestField("hr_scale", "float32", 2.0, "hires fix: upscale factor", minimum=1.0, maximum=4.0,
                 shown_in=(TXT2IMG,), a1111="hr_scale", a1111_as_is=True, a1111_default=2.0,
                 infotext="Hires upscale", label="Upscale by"),
    RequestField("hr_upscaler", "string", DEFAULT_UPSCALER, "hires fix: upscaler (A1111's latent and PIL ones, and "
                 "the upscaler models the model was exported with, --upscalers DIR)",
                 choices=lambda m: (*HIRES_UPSCALERS, *m.upscalers),
                 shown_in=(TXT2IMG,), a1111="hr_upscaler", infotext="Hires upscaler", label="Upscaler"),
    *tile_fields("upscaler", "an upscaler model's", "ESRGAN_tile"),
    *tile_fields("dat", "a DAT upscaler's", "DAT_tile"),
    *tile_fields("swinir", "a SwinIR upscaler's", "SWIN_tile"),
    RequestField("hr_second_pass_steps", "int32", 0, "hires fix: steps of the second pass; 0 = the same as steps",
                 minimum=0, maximum=MAX_STEPS, shown_in=(TXT2IMG,), a1111="hr_second_pass_steps", a1111_as_is=True,
                 a1111_default=0, infotext="Hires steps", label="Hires steps"),
    RequestField("hr_prompt", "string", "", "hires fix: the second pass's prompt; empty = the prompt",
                 max_length=lambda m: m.max_prompt_chars, shown_in=(TXT2IMG,), a1111="hr_prompt", a1111_as_is=True,
                 a1111_default="", infotext="Hires prompt", label="Hires prompt"),
    RequestField("hr_negative_prompt", "string", "", "hires fix: the second pass's negative prompt; empty = the "
                 "negative prompt", max_length=lambda m: m.max_prompt_chars, shown_in=(TXT2IMG,),
                 a1111="hr_negative_prompt", a1111_as_is=True, a1111_default="", infotext="Hires negative prompt",
                 label="Hires negative prompt"),
    RequestField("hr_sampler", "string", "", "hires fix: the second pass's sampler; empty = the first pass's",
                 choices=("", *sampler_names()), shown_in=(TXT2IMG,), a1111="hr_sampler_name",
                 infotext="Hires sampler", label="Hires sampling method"),
    RequestField("hr_schedule_type", "string", "", "hires fix: the second pass's schedule type; empty = the first "
                 "pass's", choices=("", *SCHEDULE_TYPES), shown_in=(TXT2IMG,), a1111="hr_scheduler",
                 infotext="Hires schedule type", label="Hires schedule type"),
    RequestField("hr_resize_x", "int32", 0, "hires fix: resize the width to this instead of scaling (A1111's "
                 "'Resize width to'); 0 = from the height, keeping the ratio", minimum=0,
                 maximum=lambda m: m.max_size, shown_in=(TXT2IMG,), a1111="hr_resize_x", a1111_as_is=True,
                 a1111_default=0, label="Resize width to"),
    RequestField("hr_resize_y", "int32", 0, "hires fix: resize the height to this instead of scaling (A1111's "
                 "'Resize height to'); with both, the first pass covers them and the rest is cropped",
                 minimum=0, maximum=lambda m: m.max_size, shown_in=(TXT2IMG,), a1111="hr_resize_y",
                 a1111_as_is=True, a1111_default=0, label="Resize height to"),
    RequestField("pad_conds", "bool", False, "run a prompt and negative prompt of different lengths through the "
                 "U-Net in one call, the shorter padded with empty chunks (A1111's 'Pad prompt/negative prompt to be "
                 "same length'); off: separately, each at its own length (A1111's default)",
                 a1111="override_settings.pad_cond_uncond", infotext="Pad conds"),
    RequestField("pad_conds_v0", "bool", False, "run a prompt and negative prompt of different lengths through the "
                 "U-Net in one call at the prompt's length, the negative prompt cut short or lengthened by repeating "
                 "its last vector (A1111's 'Pad prompt/negative prompt (v0)', before 1.7; wins over pad_conds)",
                 a1111="override_settings.pad_cond_uncond_v0", infotext="Pad conds v0"),
    RequestField("hr_checkpoint", "string", "", "hires fix: the model of this server that runs the second pass "
                 "(A1111's 'Hires checkpoint'; same latent space as the request's); empty = the request's",
                 max_length=MAX_MODEL_NAME, shown_in=(TXT2IMG,), a1111="hr_checkpoint_name",
                 infotext="Hires checkpoint", label="Hires checkpoint"),
    RequestField("refiner_checkpoint", "string", "", "A1111's Refiner: the model of this server (same latent space "
                 "as the request's) that takes over the sampling at refiner_switch_at (with the hires fix, in its "
                 "second pass); empty = none", max_length=MAX_MODEL_NAME, a1111="refiner_checkpoint",
                 infotext="Refiner", label="Refiner"),
    RequestField("refiner_switch_at", "float32", 0.8, "the share of the sampling done when the refiner takes over, "
                 "by noise level as A1111 counts it: (999 - timestep) / 1000", minimum=0.0, maximum=1.0,
                 a1111="refiner_switch_at", infotext="Refiner switch at", label="Switch at"),
    RequestField("refiner_switch_by_steps", "bool", False, "count the refiner's switch point in sampler steps "
                 "(the denoiser's calls so far) instead of noise level (A1111's option 'Refiner switch by sampling "
                 "steps instead of model timesteps')", a1111="override_settings.refiner_switch_by_sample_steps",
                 infotext="Refiner switch by sampling steps"),
    RequestField("hires_refiner_pass", "string", "second pass", "with the hires fix, the pass(es) the refiner may "
                 "take over in (A1111's option 'Hires fix: which pass to enable refiner for'); each starts on the "
                 "request's model (the second on the hires checkpoint)", choices=HIRES_REFINER_PASSES,
                 shown_in=(TXT2IMG,), a1111="override_settings.hires_fix_refiner_pass", infotext="Hires refiner"),
    RequestField("tiling", "bool", False, "seamless tiling (A1111's 'Tiling'): the U-Net and VAE pad circularly, so "
                 "the picture wraps at its edges; needs a model exported with --tiling", a1111="tiling",
                 infotext="Tiling", label="Tiling"),
    *hypertile_fields(),
    RequestField("restore_faces", "bool", False, "restore the faces of each picture once it is decoded, with "
                 "face_restorer (A1111's 'Restore faces'); needs a model exported with --face-restorers DIR",
                 a1111="restore_faces", label="Restore faces"),
    RequestField("face_restorer", "string", "", "the face restorer restore_faces runs: one the model was exported "
                 "with; empty = CodeFormer where it has it, else GFPGAN (A1111's option 'Face restoration model')",
                 choices=lambda m: ("", *m.face_restorers), a1111="override_settings.face_restoration_model"),
    RequestField("code_former_weight", "float32", 0.5, "CodeFormer's fidelity when it restores faces: 0 = the "
                 "most change, 1 = the least (A1111's option 'CodeFormer weight')", minimum=0.0, maximum=1.0,
                 a1111="override_settings.code_former_weight"),
    RequestField("vae", "string", "", "the VAE that decodes (and encodes img2img's picture): one the model was "
                 "exported with (--vaes DIR), by file name; empty, Automatic or None = the model's own (A1111's "
                 "'SD VAE')", max_length=MAX_MODEL_NAME, a1111="override_settings.sd_vae", infotext="VAE"),
    RequestField("randn_source", "string", "CPU",
                 "where the starting noise comes from: CPU (torch's CPU generator, as diffusers and A1111's CPU "
                 "option) or NV (the numbers an NVIDIA GPU gives for the seed, as A1111's NV and GPU options)",
                 choices=RANDN_SOURCES, a1111="override_settings.randn_source", infotext="RNG"),
    RequestField("seed_resize_from_w", "int32", 0, "draw the seed's noise as for this width, centred in the image "
                 "(A1111's 'Resize seed from width'); 0 or -1: off", minimum=-1, maximum=lambda m: m.max_size,
                 a1111="seed_resize_from_w", a1111_as_is=True, a1111_default=-1, label="Resize seed from width"),
    RequestField("seed_resize_from_h", "int32", 0, "draw the seed's noise as for this height, centred in the image "
                 "(A1111's 'Resize seed from height'); 0 or -1: off", minimum=-1, maximum=lambda m: m.max_size,
                 a1111="seed_resize_from_h", a1111_as_is=True, a1111_default=-1, label="Resize seed from height"),
    RequestField("controlnet_units", "string", "", "ControlNet: the request's units as a JSON list of "
                 "sd-webui-controlnet's unit settings (model, module, weight, guidance_start, guidance_end, "
                 "control_mode, resize_mode, pixel_perfect, processor_res, threshold_a, threshold_b, enabled); unit "
                 "i's picture is the job input controlnet_image_<i>; empty = none (A1111: "
                 "alwayson_scripts.controlnet.args)", max_length=MAX_UNITS_JSON, flag="--controlnet-units"),
    RequestField("resize_mode", "string", "Just resize", "img2img: how the init image is fitted to width x height",
                 choices=tuple(RESIZE_MODES), jobs=(IMG2IMG,), shown_in=(IMG2IMG,), a1111="resize_mode",
                 a1111_numbered=True, infotext="Resize mode", label="Resize mode"),
    RequestField("initial_noise_multiplier", "float32", 1.0, "img2img: scale of the starting noise (A1111's "
                 "'Noise multiplier for img2img')", minimum=0.0, maximum=1.5, jobs=(IMG2IMG,), shown_in=(IMG2IMG,),
                 a1111="initial_noise_multiplier", infotext="Noise multiplier", label="Noise multiplier"),
    RequestField("img2img_fix_steps", "bool", False, "img2img: run exactly `steps` steps, of a schedule stretched to "
                 "steps / denoising strength (A1111's option 'With img2img, do exactly the amount of steps the slider "
                 "specifies'; off: denoising strength x steps of `steps`)", jobs=(IMG2IMG,), shown_in=(IMG2IMG,),
                 a1111="override_settings.img2img_fix_steps"),
    RequestField("mask_blur", "int32", 4, "inpainting: Gaussian blur radius of the mask, in pixels", minimum=0,
                 maximum=64, jobs=(IMG2IMG,), shown_in=(IMG2IMG,), a1111="mask_blur", infotext="Mask blur",
                 label="Mask blur"),
    RequestField("mask_round", "bool", True, "inpainting: the latents blend by the mask rounded to 0 or 1 (A1111's "
                 "default); off: by the blurred mask's own values, a soft blend (with an ordinary U-Net)",
                 jobs=(IMG2IMG,), shown_in=(IMG2IMG,), a1111="mask_round", a1111_as_is=True, a1111_default=True),
    RequestField("soft_inpainting", "bool", False, "inpainting: A1111's Soft Inpainting (its built-in extension): "
                 "the picture's latents blend in by the mask at every step as the noise level says, and the result "
                 "is pasted over the original where it changed (A1111's k-diffusion and timestep samplers)",
                 jobs=(IMG2IMG,), shown_in=(IMG2IMG,), infotext="Soft inpainting enabled", label="Soft inpainting"),
    *(RequestField(f"soft_inpainting_{name}", "float32", default, f"soft inpainting: {help}", minimum=low,
                   maximum=high, jobs=(IMG2IMG,), shown_in=(IMG2IMG,), infotext=f"Soft inpainting {name.replace('_', ' ')}",
                   label=name.replace("_", " ").capitalize())
      for name, default, low, high, help in (
          ("schedule_bias", 1.0, 0.0, 8.0, "when the original is preserved: the mask's power grows as sigma to this"),
          ("preservation_strength", 0.5, 0.0, 8.0, "how strongly partly masked content is kept"),
          ("transition_contrast_boost", 4.0, 1.0, 32.0, "the blend's magnitude power: contrast kept where it blends"),
          ("mask_influence", 0.0, 0.0, 1.0, "how much the mask biases the difference threshold"),
          ("difference_threshold", 0.5, 0.0, 8.0, "how much a region may change before the original stops showing"),
          ("difference_contrast", 2.0, 0.0, 8.0, "how sharp the step between original and redrawn is"))),
    RequestField("inpaint_full_res", "bool", False,
                 "inpainting: redraw only the masked area, at full resolution (A1111's 'Only masked')",
                 jobs=(IMG2IMG,), shown_in=(IMG2IMG,), a1111="inpaint_full_res", a1111_as_is=True, a1111_default=True,
                 label="Inpaint area"),
    RequestField("inpaint_full_res_padding", "int32", 32, "inpainting: pixels of context around the masked area",
                 minimum=0, maximum=256, jobs=(IMG2IMG,), shown_in=(IMG2IMG,), a1111="inpaint_full_res_padding",
                 a1111_as_is=True, a1111_default=0, infotext="Masked area padding",
                 label="Only masked padding, pixels"),
    RequestField("inpainting_fill", "string", "original", "inpainting: what the masked area starts from (A1111's "
                 "'Masked content'): fill (the colours around it), original, latent noise, latent nothing",
                 choices=INPAINTING_FILLS, jobs=(IMG2IMG,), shown_in=(IMG2IMG,), a1111="inpainting_fill",
                 a1111_numbered=True, infotext="Masked content", label="Masked content"),
)
BY_NAME: dict[str, RequestField] = {f.name: f for f in FIELDS}
assert len(BY_NAME) == len(FIELDS), "a request field is declared twice"


def fields_of(job: str) -> tuple[RequestField, ...]:
    """The fields an sdtrt request of ``job`` carries, in the table's order."""
    return tuple(f for f in FIELDS if job in f.jobs)


def request_table(limits: ModelLimits) -> dict[str, FieldSpec]:
    """One model's request table (every field, both jobs'): export stores it in the spec."""
    return {f.name: f.spec(limits) for f in FIELDS}


# Derived tables, for the code that reads the other names.
INFOTEXT_FIELDS: dict[str, str] = {f.infotext: f.name for f in FIELDS if f.infotext}  # infotext key -> field
A1111_AS_IS: dict[str, str] = {f.a1111: f.name for f in FIELDS if f.a1111_as_is}  # A1111 name -> field
A1111_NAMES: dict[str, str] = {f.name: f.a1111 for f in FIELDS if f.a1111}  # field -> A1111 name (errors)
LABELS: dict[str, str] = {f.name: f.label for f in FIELDS if f.label}


def tab_fields(tab: str) -> tuple[str, ...]:
    """The fields the page's ``tab`` (txt2img, img2img) has a control for, in the table's order."""
    return tuple(f.name for f in FIELDS if f.label and not f.quicksetting and tab in f.shown_in)
