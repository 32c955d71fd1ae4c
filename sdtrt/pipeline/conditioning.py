"""What the U-Net is conditioned on, by the names of its inputs (the spec says which it has).

Every U-Net takes the text context (``encoder_hidden_states``). SDXL's also takes its added conditions: the second
text encoder's pooled output (``text_embeds``) and the micro-conditioning ``time_ids`` (original size, crop top-left,
target size), which A1111 sends as the pass's own size, no crop. A prompt's conditioning is a dict of those tensors
with one row; the loop's is the same dict with a row per U-Net row (uncond x N, cond x N with guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch

from sdtrt.contract.spec import (CONTROL_HINT, CONTROL_SCALES, HYPERTILE_INPUT, HYPERTILE_SUFFIX, ModelSpec, TensorSpec,
                                 dim_factor, is_residual)
from sdtrt.requests.controlnet import control_hint
from sdtrt.requests.plan import PromptSchedule
from sdtrt.requests.prompts import CHUNK_TOKENS, apply_weights, text_chunks

CONTEXT_INPUT = "encoder_hidden_states"
TEXT_OUTPUT = "text_embeddings"
POOLED_OUTPUT = "pooled_embeddings"  # the text encoder's pooled output (SDXL)
POOLED_INPUT = "text_embeds"  # ... as the U-Net takes it
TIME_IDS = "time_ids"
TEXT_LENGTH = "text_length"  # each row's own context length (its text's chunks x 77): not a U-Net input
COND_MARK = "cond_mark"  # each row's kind: 0 for the uncond's, 1 for a cond's (ControlNet's CFG injection): not one

Conditioning = dict[str, torch.Tensor]


def prompt_conditioning(outputs: dict[str, np.ndarray], weights: np.ndarray, normalize: bool = True
                        ) -> tuple[Conditioning, Conditioning]:
    """(uncond, cond) from the text encoder's outputs for the negative prompt's k chunk rows then the prompt's:
    the A1111-weighted chunks side by side as the context (``normalize``: their means restored, A1111's emphasis
    but "No norm"), and (SDXL) the pooled output of each one's first chunk, as A1111 takes it."""
    uncond, cond = torch.from_numpy(apply_weights(outputs[TEXT_OUTPUT], weights, normalize)).split(1)
    u, c = {CONTEXT_INPUT: uncond}, {CONTEXT_INPUT: cond}
    for side, chunks in zip((u, c), text_chunks(weights)):
        side[TEXT_LENGTH] = torch.tensor([chunks * (CHUNK_TOKENS + 2)])
    if POOLED_OUTPUT in outputs:
        pooled = torch.from_numpy(np.ascontiguousarray(outputs[POOLED_OUTPUT], dtype=np.float32))
        k = len(pooled) // 2
        u[POOLED_INPUT], c[POOLED_INPUT] = pooled[0:1], pooled[k:k + 1]
    return u, c


@dataclass
class ScheduledConditioning:
    """A request's conditioning step by step, as A1111's prompt editing and alternation change it
    (sdtrt.requests.plan): entries (last 0-based step, uncond, one cond per AND subprompt) in step order, and
    each subprompt's weight (composable diffusion; one subprompt of weight 1 for a plain prompt)."""

    entries: list[tuple[int, Conditioning, tuple[Conditioning, ...]]]
    weights: tuple[float, ...] = (1.0,)

    def index(self, step: int) -> int:
        """The entry for the 0-based step ``step``: the first whose last step is not before it (A1111's rule)."""
        return next((i for i, (last, _, _) in enumerate(self.entries) if step <= last), len(self.entries) - 1)


def scheduled_conditioning(schedule: PromptSchedule, encoded: list[tuple[Conditioning, Conditioning]],
                           pad_v0: bool = False) -> ScheduledConditioning:
    """A pass's schedule (sdtrt.requests.plan) with its texts' conditioning: ``encoded[i]`` is (uncond, cond) of the
    plan's i-th text pair, each encoded once for the whole request (``pad_v0``: the uncond fitted to the conds as
    A1111's pad_cond_uncond_v0 does)."""
    entries = []
    for last, indices in schedule.entries:
        uncond, conds = _same_length([encoded[i] for i in indices])
        entries.append((last, _padded_v0(uncond, conds) if pad_v0 else uncond, conds))
    return ScheduledConditioning(entries, schedule.weights)


def _padded_v0(uncond: Conditioning, conds: tuple[Conditioning, ...]) -> Conditioning:
    """A1111's "Pad prompt/negative prompt (v0)" (before 1.7): the negative prompt's context at the prompt's
    length, lengthened by repeating its last vector or cut short, so that both run in one U-Net call."""
    target, own = int(conds[0][TEXT_LENGTH].reshape(-1)[0]), int(uncond[TEXT_LENGTH].reshape(-1)[0])
    if own < target:
        context = uncond[CONTEXT_INPUT].clone()
        context[:, own:target] = context[:, own - 1:own]
        return {**uncond, CONTEXT_INPUT: context, TEXT_LENGTH: torch.tensor([target])}
    if own > target:
        return {**uncond, TEXT_LENGTH: torch.tensor([target])}
    return uncond


def _own_length(side: Conditioning) -> int:
    return int(side[TEXT_LENGTH].reshape(-1)[0])


def _same_length(pairs: list[tuple[Conditioning, Conditioning]]) -> tuple[Conditioning, tuple[Conditioning, ...]]:
    """One uncond and the subprompts' conds with contexts of one width, so that the rows can share a U-Net call.
    Each pair is padded to its longer text with the empty prompt's chunks; the uncond is the widest pair's. With
    several subprompts (AND), A1111 stacks the conds alone (stack_conds): each text's own context, its last vector
    repeated up to the longest subprompt's length (their one length), then the pair's empty chunks up to the
    uncond's (what pad_cond_uncond adds, when asked)."""
    uncond = max((u for u, _ in pairs), key=lambda c: c[CONTEXT_INPUT].shape[1])
    width = uncond[CONTEXT_INPUT].shape[1]
    stacked = max(_own_length(cond) for _, cond in pairs) if len(pairs) > 1 else width
    conds = []
    for _, cond in pairs:
        context, own = cond[CONTEXT_INPUT], (_own_length(cond) if len(pairs) > 1 else cond[CONTEXT_INPUT].shape[1])
        parts = [context[:, :own], context[:, own - 1:own].expand(-1, stacked - own, -1)]
        if width > stacked:  # (the empty chunks a longer negative prompt padded this pair with)
            parts.append(context[:, stacked:width])
        cond = {**cond, CONTEXT_INPUT: torch.cat(parts, dim=1)}
        if len(pairs) > 1:  # stacked: the subprompts share one length, A1111's
            cond = {**cond, TEXT_LENGTH: torch.tensor([stacked])}
        conds.append(cond)
    return uncond, tuple(conds)


def guided(guidance_scale: float, subprompts: int) -> bool:
    """Whether the U-Net also runs the uncond rows: with guidance (as diffusers, above 1), and always for
    composable diffusion, whose subprompts are each weighed against the uncond."""
    return guidance_scale > 1.0 or subprompts > 1


def unet_conditioning(spec: ModelSpec, uncond: Conditioning, conds: tuple[Conditioning, ...], images: int,
                      with_uncond: bool, size: tuple[int, int], device: torch.device,
                      crop: tuple[int, int] = (0, 0)) -> Conditioning:
    """The U-Net's conditioning inputs for ``images`` images of ``size`` (width, height): [uncond x N, cond_1 x N,
    ..., cond_K x N] ``with_uncond`` (K: the AND subprompts; ``Guidance.with_uncond``), [cond x N] without; SDXL's
    time ids with the crop's (top, left) as A1111's sdxl_crop_top / sdxl_crop_left give them."""
    rows = {name: torch.cat(([uncond[name]] * images if with_uncond else []) + [c[name] for c in conds for _ in range(images)])
            for name in conds[0]}
    rows[COND_MARK] = torch.tensor([0.0] * images * with_uncond + [1.0] * images * len(conds))
    names = {t.name for t in spec.component("unet").inputs}
    if TIME_IDS in names:
        (width, height), (top, left) = size, crop
        ids = torch.tensor([[height, width, top, left, height, width]], dtype=torch.float32)
        rows[TIME_IDS] = ids.repeat(images * (len(conds) + with_uncond), 1)
    return {name: value.to(device) for name, value in rows.items()}


def unet_network(conditioning: Conditioning) -> str:
    """The U-Net network a call runs: its Hypertile variant where the conditioning carries the call's tiles."""
    return "unet" + HYPERTILE_SUFFIX if HYPERTILE_INPUT in conditioning else "unet"


def unet_inputs(spec: ModelSpec, conditioning: Conditioning, sample: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The conditioning in the order of the U-Net's inputs after the sample and the timestep; a U-Net exported with
    ControlNets takes their residuals, zeros when no unit is active (``sdtrt.pipeline.control``)."""
    inputs = []
    for t in spec.component(unet_network(conditioning)).inputs[2:]:
        value = conditioning.get(t.name)
        if value is None and is_residual(t.name):
            value = zero_residual(t, sample)
        inputs.append(value if value is not None else conditioning[t.name])
    return tuple(inputs)


_ZEROS: dict[tuple, torch.Tensor] = {}  # (shape, device) -> zeros: read only, by every call that has no unit


def zero_residual(tensor: TensorSpec, sample: torch.Tensor) -> torch.Tensor:
    """A residual of zeros for ``sample``'s rows and size (its level's size: the latents' over its dims' factor)."""
    rows, (h, w) = sample.shape[0], sample.shape[2:]
    shape = (rows, int(tensor.shape[1]), *(-(-size // dim_factor(str(dim))[1]) for size, dim in zip((h, w), tensor.shape[2:])))
    key = (shape, sample.device)
    if key not in _ZEROS:
        if len(_ZEROS) > 64:  # (a server sees a bounded set of sizes; an unbounded one is not kept)
            _ZEROS.clear()
        _ZEROS[key] = torch.zeros(shape, dtype=torch.float32, device=sample.device)
    return _ZEROS[key]


class ControlledUNet:
    """The U-Net steered by a request's ControlNet units (sdtrt.requests.controlnet): each call runs the units
    whose guidance window holds the pass's current step, each ControlNet on the call's own rows (the U-Net's input
    latents, timestep and conditioning, the unit's control map at the pass's size), and gives the U-Net the sum of
    their residuals, each scaled by the unit's weight and control mode; a call with no active unit runs the U-Net
    alone (its residual inputs zeros: ``unet_inputs``). ``steps``: the pass's steps; ``steered`` wraps the pass's
    conditioning so that each step's is asked for with its step number, which the windows follow."""

    def __init__(self, unet, nets, spec: ModelSpec, units: tuple, size: tuple[int, int], steps: int):
        self.unet, self.nets, self.spec, self.units, self.steps = unet, nets, spec, units, steps
        self.step = 0
        width, height = size
        self.hints = [torch.from_numpy(control_hint(unit, width, height))[None].to(nets.device) for unit in units]

    def steered(self, context):
        """The pass's conditioning (a callable of the step), noting each step it is asked for."""
        def at(step: int) -> Conditioning:
            self.step = step
            return context(step)

        return at

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: Conditioning) -> torch.Tensor:
        active = [(unit, hint) for unit, hint in zip(self.units, self.hints) if unit.active(self.step, self.steps)]
        if not active:
            return self.unet(sample, timestep, context)
        summed: dict[str, torch.Tensor] = {}
        for unit, hint in active:
            outputs = self.nets.controlnet(unit.network, self._inputs(unit, hint, sample, timestep, context))
            for name, value in outputs.items():
                summed[name] = summed[name] + value if name in summed else value
        return self.unet(sample, timestep, {**context, **summed})

    def _inputs(self, unit, hint: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor,
                context: Conditioning) -> dict[str, torch.Tensor]:
        component = self.spec.component(unit.network)
        channels = int(component.inputs[0].shape[1])  # (an inpainting U-Net's extra channels are not the ControlNet's)
        residuals = len(component.outputs)
        rows = sample.shape[0]
        scales = torch.tensor(unit.scales(residuals), dtype=torch.float32, device=sample.device).repeat(rows, 1)
        if not unit.uncond_too:  # the uncond rows get none of this unit (its CFG injection)
            scales = scales * context[COND_MARK].to(sample.device)[:, None]
        return {**context, component.inputs[0].name: sample[:, :channels], component.inputs[1].name: timestep,
                CONTROL_HINT: hint.expand(rows, -1, -1, -1), CONTROL_SCALES: scales}
