"""What the U-Net is conditioned on, by the names of its inputs (the spec says which it has).

Every U-Net takes the text context (``encoder_hidden_states``). SDXL's also takes its added conditions: the second
text encoder's pooled output (``text_embeds``) and the micro-conditioning ``time_ids`` (original size, crop top-left,
target size), which A1111 sends as the pass's own size, no crop. A prompt's conditioning is a dict of those tensors
with one row; the loop's is the same dict with a row per U-Net row (uncond x N, cond x N with guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from sdtrt.contract.spec import ModelSpec
from sdtrt.requests.prompt_schedule import composable_prompts, prompt_schedule, text_at
from sdtrt.requests.prompts import apply_weights

CONTEXT_INPUT = "encoder_hidden_states"
TEXT_OUTPUT = "text_embeddings"
POOLED_OUTPUT = "pooled_embeddings"  # the text encoder's pooled output (SDXL)
POOLED_INPUT = "text_embeds"  # ... as the U-Net takes it
TIME_IDS = "time_ids"

Conditioning = dict[str, torch.Tensor]


def prompt_conditioning(outputs: dict[str, np.ndarray], weights: np.ndarray) -> tuple[Conditioning, Conditioning]:
    """(uncond, cond) from the text encoder's outputs for the negative prompt's k chunk rows then the prompt's:
    the A1111-weighted chunks side by side as the context, and (SDXL) the pooled output of each one's first
    chunk, as A1111 takes it."""
    uncond, cond = torch.from_numpy(apply_weights(outputs[TEXT_OUTPUT], weights)).split(1)
    u, c = {CONTEXT_INPUT: uncond}, {CONTEXT_INPUT: cond}
    if POOLED_OUTPUT in outputs:
        pooled = torch.from_numpy(np.ascontiguousarray(outputs[POOLED_OUTPUT], dtype=np.float32))
        k = len(pooled) // 2
        u[POOLED_INPUT], c[POOLED_INPUT] = pooled[0:1], pooled[k:k + 1]
    return u, c


@dataclass
class ScheduledConditioning:
    """A request's conditioning step by step, as A1111's prompt editing and alternation change it
    (sdtrt.requests.prompt_schedule): entries (last 0-based step, uncond, one cond per AND subprompt) in step order, and
    each subprompt's weight (composable diffusion; one subprompt of weight 1 for a plain prompt)."""

    entries: list[tuple[int, Conditioning, tuple[Conditioning, ...]]]
    weights: tuple[float, ...] = (1.0,)

    def index(self, step: int) -> int:
        """The entry for the 0-based step ``step``: the first whose last step is not before it (A1111's rule)."""
        return next((i for i, (last, _, _) in enumerate(self.entries) if step <= last), len(self.entries) - 1)


def schedule_conditioning(prompt: str, negative_prompt: str, steps: int,
                          encode: Callable[[str, str], tuple[Conditioning, Conditioning]],
                          first_pass_steps: int | None = None,
                          encoded: dict[tuple[str, str], tuple[Conditioning, Conditioning]] | None = None,
                          ) -> ScheduledConditioning:
    """The schedules of the prompt's subprompts (split at AND) and of the negative prompt over ``steps`` steps,
    merged; ``encode(prompt, negative)`` runs once per distinct pair of texts (``encoded`` carries them between
    a request's passes)."""
    encoded = {} if encoded is None else encoded
    subprompts = composable_prompts(prompt)
    positives = [prompt_schedule(text, steps, first_pass_steps) for text, _ in subprompts]
    negative = prompt_schedule(negative_prompt, steps, first_pass_steps)
    entries = []
    for last in sorted({step for schedule in positives + [negative] for step, _ in schedule}):
        pairs = [(text_at(positive, last), text_at(negative, last)) for positive in positives]
        for pair in pairs:
            if pair not in encoded:
                encoded[pair] = encode(*pair)
        uncond, conds = _same_length([encoded[pair] for pair in pairs])
        entries.append((last, uncond, conds))
    return ScheduledConditioning(entries, tuple(weight for _, weight in subprompts))


def _same_length(pairs: list[tuple[Conditioning, Conditioning]]) -> tuple[Conditioning, tuple[Conditioning, ...]]:
    """One uncond and the subprompts' conds with contexts of one length: each pair is already padded to its
    longer text; the uncond is the longest pair's, and shorter conds repeat their last vector (A1111's
    stack_conds), so that the rows can share a U-Net call."""
    uncond = max((u for u, _ in pairs), key=lambda c: c[CONTEXT_INPUT].shape[1])
    length = uncond[CONTEXT_INPUT].shape[1]
    conds = []
    for _, cond in pairs:
        context = cond[CONTEXT_INPUT]
        if context.shape[1] < length:
            tail = context[:, -1:].expand(-1, length - context.shape[1], -1)
            cond = {**cond, CONTEXT_INPUT: torch.cat([context, tail], dim=1)}
        conds.append(cond)
    return uncond, tuple(conds)


def guided(guidance_scale: float, subprompts: int) -> bool:
    """Whether the U-Net also runs the uncond rows: with guidance (as diffusers, above 1), and always for
    composable diffusion, whose subprompts are each weighed against the uncond."""
    return guidance_scale > 1.0 or subprompts > 1


def unet_conditioning(spec: ModelSpec, uncond: Conditioning, conds: tuple[Conditioning, ...], images: int,
                      guidance_scale: float, width: int, height: int, device: torch.device) -> Conditioning:
    """The U-Net's conditioning inputs for ``images`` images at ``width`` x ``height``: [uncond x N, cond_1 x N,
    ..., cond_K x N] with guidance (K: the AND subprompts), [cond x N] without."""
    with_uncond = guided(guidance_scale, len(conds))
    rows = {name: torch.cat(([uncond[name]] * images if with_uncond else []) + [c[name] for c in conds for _ in range(images)])
            for name in conds[0]}
    names = {t.name for t in spec.component("unet").inputs}
    if TIME_IDS in names:
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        rows[TIME_IDS] = ids.repeat(images * (len(conds) + with_uncond), 1)
    return {name: value.to(device) for name, value in rows.items()}


def unet_inputs(spec: ModelSpec, conditioning: Conditioning) -> tuple[torch.Tensor, ...]:
    """The conditioning in the order of the U-Net's inputs after the sample and the timestep."""
    return tuple(conditioning[t.name] for t in spec.component("unet").inputs[2:])
