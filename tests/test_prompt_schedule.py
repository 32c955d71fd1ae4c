"""A1111's prompt editing and alternation, read as A1111 reads them (sdtrt.requests.prompt_schedule).

The table is A1111's own: the doctests of get_learned_conditioning_prompt_schedules in A1111's
modules/prompt_parser.py (v1.6+ scheduling), each prompt with the schedule A1111 gives for 10 steps, or for a
hires pass of 10 steps after 10."""

from __future__ import annotations

import pytest

from sdtrt.requests.prompt_schedule import prompt_schedule, text_at

A1111_EXAMPLES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
]
A1111_HIRES_EXAMPLES = [  # the same function with hires_steps=10 after base_steps=10
    ("a [b:.5] c", [(10, "a b c")]),
    ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),
]


@pytest.mark.parametrize("prompt,expected", A1111_EXAMPLES)
def test_a1111s_examples(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize("prompt,expected", A1111_HIRES_EXAMPLES)
def test_a1111s_hires_examples(prompt, expected):
    assert prompt_schedule(prompt, 10, first_pass_steps=10) == expected


def test_the_case_a1111_marks_as_not_handled_is_read_as_text():
    """A1111's table also has `a [{b|d{:.5] c` -> [[5, 'a  c'], [10, 'a {b|d{ c']], flagged there as "not
    handling this right now" (a `|` inside a plain word). sdtrt keeps that prompt as written instead."""
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


def test_forms_users_write():
    assert prompt_schedule("[cat:dog:0.5]", 20) == [(10, "cat"), (20, "dog")]
    assert prompt_schedule("[cat:dog:10]", 20) == [(10, "cat"), (20, "dog")]
    assert prompt_schedule("a [cat::0.3] house", 10) == [(3, "a cat house"), (10, "a  house")]
    assert prompt_schedule("[:dog:0.7]", 10) == [(7, ""), (10, "dog")]
    assert prompt_schedule("[cat|dog]", 3) == [(1, "cat"), (2, "dog"), (3, "cat")]
    assert prompt_schedule(r"a \[literal\] (red:1.2)", 5) == [(5, r"a \[literal\] (red:1.2)")]
    assert prompt_schedule("a | b", 5) == [(5, "a | b")]  # unreadable: one text throughout
    assert prompt_schedule("[cat:dog:30]", 20) == [(20, "cat")]  # past the end: never switches


def test_the_sampler_picks_an_entry_as_a1111s_does():
    """A1111's reconstruct_cond_batch: at 0-based step s, the first entry whose step is >= s, so [cat:dog:10]
    of 20 steps draws cat for steps 0..10 (11 steps) and dog for 11..19, and alternation's first text holds
    for steps 0 and 1."""
    edit = prompt_schedule("[cat:dog:10]", 20)
    assert [text_at(edit, s) for s in range(20)] == ["cat"] * 11 + ["dog"] * 9
    turns = prompt_schedule("[cat|dog]", 5)
    assert [text_at(turns, s) for s in range(5)] == ["cat", "cat", "dog", "cat", "dog"]


# --- the generation: sdtrt against diffusers driven step by step with the same conditioning schedule ---------

def scheduled_reference(pipe, texts: list[tuple[str, str]], *, sampler: str, steps: int, cfg: float, seed: int,
                        width: int, height: int):
    """diffusers' own pipeline, its prompt embeddings swapped before each step for that step's (prompt, negative)
    in ``texts`` (one pair per step, written out by the test), each pair through diffusers' encode_prompt.
    Returns its final latents (before the VAE), where a change of conditioning shows even on a random model."""
    import torch

    from reference import reference_scheduler

    cache: dict = {}

    def embeddings(prompt: str, negative: str):
        if (prompt, negative) not in cache:
            with torch.no_grad():
                cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
            cache[prompt, negative] = (cond, uncond)
        return cache[prompt, negative]

    def before_next_step(pipeline, i, t, kwargs):
        if i + 1 < len(texts):
            cond, uncond = embeddings(*texts[i + 1])
            return {"prompt_embeds": torch.cat([uncond, cond])}  # the pipeline's [uncond, cond] rows
        return {}

    original = pipe.scheduler
    pipe.scheduler = reference_scheduler(sampler, original.config, seed)
    cond, uncond = embeddings(*texts[0])
    try:
        latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,
                       guidance_scale=cfg, width=width, height=height,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                       callback_on_step_end=before_next_step,
                       callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    finally:
        pipe.scheduler = original
    assert len(cache) == len(set(texts))
    return latents


def sdtrt_latents(local_pipeline, request):
    """sdtrt's in-process job up to the final latents (scaled back to the U-Net's space, as diffusers returns them)."""
    from sdtrt.pipeline.jobs import encode_prompts, txt2img_latents

    plan = local_pipeline.plan(request)
    nets = local_pipeline.networks(plan)
    return txt2img_latents(plan, encode_prompts(plan, nets), nets) * plan.spec.vae_scaling_factor


CAT, DOG = "a red cat on a sofa", "a blue dog in the snow"
GENERATIONS = [
    # (prompt, negative prompt, sampler, steps, each 0-based step's (prompt, negative) by A1111's rules)
    (f"[{CAT}:{DOG}:0.5]", "blurry", "Euler a", 10, [(CAT, "blurry")] * 6 + [(DOG, "blurry")] * 4),
    (f"[{CAT}:{DOG}:3]", "[blurry:sharp:0.6]", "DPM++ 2M", 8,
     [(CAT, "blurry")] * 4 + [(DOG, "blurry")] * 1 + [(DOG, "sharp")] * 3),
    (f"[{CAT}|{DOG}]", "", "Euler", 6,
     [(CAT, ""), (CAT, ""), (DOG, ""), (CAT, ""), (DOG, ""), (CAT, "")]),
]


@pytest.mark.parametrize("prompt,negative,sampler,steps,texts", GENERATIONS)
def test_edited_prompts_draw_what_diffusers_draws_with_that_schedule(prompt, negative, sampler, steps, texts,
                                                                     local_pipeline, diffusers_pipe):
    from sdtrt.requests.request import Txt2ImgRequest

    expected = scheduled_reference(diffusers_pipe, texts, sampler=sampler, steps=steps, cfg=7.0, seed=99,
                                   width=64, height=64)
    ours = sdtrt_latents(local_pipeline, Txt2ImgRequest(prompt=prompt, negative_prompt=negative, sampler=sampler,
                                                         steps=steps, guidance_scale=7.0, seed=99, width=64,
                                                         height=64))
    error = (ours - expected).abs().max().item()
    # the same schedule without its switches (the first texts throughout): what ignoring the syntax would give
    unswitched = scheduled_reference(diffusers_pipe, [texts[0]] * steps, sampler=sampler, steps=steps, cfg=7.0,
                                     seed=99, width=64, height=64)
    change = (unswitched - expected).abs().max().item()
    assert error < 1e-3 and change > 50 * error, (error, change)


def test_each_distinct_text_is_encoded_once(local_pipeline):
    from sdtrt.pipeline.jobs import encode_prompts
    from sdtrt.requests.request import Txt2ImgRequest

    class Counting:
        def __init__(self, nets):
            self.nets, self.calls = nets, []

        def encode_texts(self, texts, clip_skip, clip_l_skip=False):
            self.calls.append(texts)
            return self.nets.encode_texts(texts, clip_skip, clip_l_skip)

    plan = local_pipeline.plan(Txt2ImgRequest(prompt="[cat|dog|fox]", negative_prompt="[ugly:plain:10]", steps=30,
                                              enable_hr=True, hr_scale=1.5, width=64, height=64))
    nets = Counting(local_pipeline.networks(plan))
    prompts = encode_prompts(plan, nets)
    assert len(nets.calls) == len(set(nets.calls)) == 6  # 3 animals x 2 negatives, the hires pass's included
    assert len(prompts.first.entries) == 30 and len(prompts.hires.entries) == 30  # alternation: every step
    texts = {(pair.prompt[0][0], pair.negative[0][0]) for pair in nets.calls}
    assert texts == {(a, n) for a in ("cat", "dog", "fox") for n in ("ugly", "plain")}


def test_served_prompt_editing_matches_in_process_first_pass_and_hires(server, local_pipeline):
    """The served job (tokenizer, text encoder and U-Net through BLS) follows the same schedules, the hires fix's
    second pass counting on from the first's ([cat:dog:1.5]: dog from halfway through the second pass)."""
    from sdtrt.client import Client
    from sdtrt.requests.request import Txt2ImgRequest

    settings = dict(prompt=f"[{CAT}:{DOG}:1.5]", negative_prompt="[blurry|grainy]", sampler="Euler", steps=6,
                    guidance_scale=7.0, seed=3, width=64, height=64, enable_hr=True, hr_scale=1.5,
                    hr_second_pass_steps=4, denoising_strength=0.7, hr_upscaler="Latent")
    served = Client(server.url).txt2img(**settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(**settings))
    assert (served.images == local.images).all()
    assert settings["prompt"] in served.infotexts[0]  # the infotext keeps the prompt as written, as A1111's


# --- AND: A1111's composable diffusion -------------------------------------------------------------------

def test_subprompts_and_weights_as_a1111_splits_them():
    from sdtrt.requests.prompt_schedule import composable_prompts

    assert composable_prompts("a cat AND a dog :1.2") == [("a cat", 1.0), (" a dog", 1.2)]
    assert composable_prompts("x AND y:0.5 AND z : -1") == [("x", 1.0), (" y", 0.5), (" z", -1.0)]
    assert composable_prompts("ANDROID and a cat") == [("ANDROID and a cat", 1.0)]  # AND only as a word
    assert composable_prompts("a (red:1.2) cat") == [("a (red:1.2) cat", 1.0)]  # attention is not a weight
    assert composable_prompts("a photo:2") == [("a photo", 2.0)]  # A1111 weighs a lone prompt too


def composable_reference(pipe, subprompts: list[tuple[str, float]], negative: str, *, sampler: str, steps: int,
                         cfg: float, seed: int, width: int, height: int):
    """diffusers' U-Net and scheduler driven by hand with composable diffusion's guidance, as its paper and
    A1111 combine it: uncond + cfg * sum(w_k * (cond_k - uncond)), the noise and step noise from the seed's
    generator as diffusers' pipeline draws them. Final latents."""
    import torch

    from reference import reference_scheduler

    scheduler = reference_scheduler(sampler, pipe.scheduler.config, seed)
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, pipe.unet.config.in_channels, height // 8, width // 8), generator=generator)
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        encoded = [pipe.encode_prompt(text, "cpu", 1, True, negative_prompt=negative) for text, _ in subprompts]
        context = torch.cat([encoded[0][1]] + [cond for cond, _ in encoded])
        for t in scheduler.timesteps:
            rows = scheduler.scale_model_input(torch.cat([latents] * (len(subprompts) + 1)), t)
            uncond, *conds = pipe.unet(rows, t, encoder_hidden_states=context).sample.chunk(len(subprompts) + 1)
            noise = uncond + sum(w * cfg * (c - uncond) for (_, w), c in zip(subprompts, conds))
            latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
    return latents


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_and_draws_what_composable_diffusion_draws(sampler, local_pipeline, diffusers_pipe):
    from sdtrt.requests.request import Txt2ImgRequest

    subprompts = [("a red cat on a sofa", 1.0), (" a blue dog in the snow", 0.7)]
    expected = composable_reference(diffusers_pipe, subprompts, "blurry", sampler=sampler, steps=8, cfg=6.0, seed=5,
                                    width=64, height=64)
    ours = sdtrt_latents(local_pipeline, Txt2ImgRequest(
        prompt="a red cat on a sofa AND a blue dog in the snow :0.7", negative_prompt="blurry", sampler=sampler,
        steps=8, guidance_scale=6.0, seed=5, width=64, height=64))
    error = (ours - expected).abs().max().item()
    alone = composable_reference(diffusers_pipe, subprompts[:1], "blurry", sampler=sampler, steps=8, cfg=6.0, seed=5,
                                 width=64, height=64)  # what reading AND as a word of the first prompt would be near
    assert error < 1e-3 and (alone - expected).abs().max().item() > 50 * error


def test_served_and_matches_in_process_with_editing_inside(server, local_pipeline):
    from sdtrt.client import Client
    from sdtrt.requests.request import Txt2ImgRequest

    settings = dict(prompt="a [red:green:0.5] cat AND a dog :0.6 AND a tree:0.3", negative_prompt="grainy",
                    sampler="Euler a", steps=6, guidance_scale=7.0, seed=8, width=64, height=64, batch_size=2)
    served = Client(server.url).txt2img(**settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(**settings))
    assert (served.images == local.images).all()


def test_more_subprompts_than_one_unet_call_takes_are_refused_by_name(local_pipeline):
    from sdtrt.contract.errors import InvalidRequest
    from sdtrt.requests.request import Txt2ImgRequest
    from sdtrt.contract.spec import UNET_BATCH

    most = local_pipeline.spec.dims[UNET_BATCH].max
    prompt = " AND ".join(["a cat"] * most)
    with pytest.raises(InvalidRequest, match="AND subprompts") as caught:
        local_pipeline.txt2img(Txt2ImgRequest(prompt=prompt, steps=2, width=64, height=64))
    assert caught.value.field == "prompt"


@pytest.mark.parametrize("subprompts, negative_chunks", [(("a cat", "a dog"), 2), (("a cat", "long"), 2),
                                                         (("a cat", "long"), 1)])
def test_and_stacks_the_subprompts_alone_as_a1111_however_long_the_negative_prompt(local_pipeline, diffusers_pipe,
                                                                                    subprompts, negative_chunks):
    """A1111's reconstruct_multicond_batch: the subprompts' conds stacked to the longest one's length, each one's
    last vector repeated (stack_conds), the negative prompt at its own length; each text encoded as A1111 encodes
    it (tests/test_a1111_exact.py's a1111_text)."""
    import torch

    from sdtrt.pipeline.conditioning import CONTEXT_INPUT, TEXT_LENGTH
    from sdtrt.pipeline.jobs import encode_prompts
    from sdtrt.requests.request import Txt2ImgRequest
    from test_a1111_exact import a1111_text

    long = ", ".join(["a tall red lighthouse"] * 20)  # 2 chunks
    texts = [long if text == "long" else text for text in subprompts]
    negative = ", ".join(["blurry, grainy, dark"] * (18 if negative_chunks == 2 else 1))
    plan = local_pipeline.plan(Txt2ImgRequest(prompt=" AND ".join(texts), negative_prompt=negative, width=64,
                                              height=64, steps=2))
    _, uncond, conds = encode_prompts(plan, local_pipeline.networks(plan)).first.entries[0]
    with torch.no_grad():
        own = [a1111_text(diffusers_pipe, text, 1) for text in texts]
        expected_uncond = a1111_text(diffusers_pipe, negative, 1)
    stacked = max(c.shape[1] for c in own)
    assert int(uncond[TEXT_LENGTH]) == expected_uncond.shape[1] == 77 * negative_chunks
    assert torch.abs(uncond[CONTEXT_INPUT][:, :expected_uncond.shape[1]] - expected_uncond).max() < 1e-4
    for cond, mine in zip(conds, own):
        expected = torch.cat([mine, mine[:, -1:].expand(-1, stacked - mine.shape[1], -1)], dim=1)
        assert int(cond[TEXT_LENGTH]) == stacked
        assert torch.abs(cond[CONTEXT_INPUT][:, :stacked] - expected).max() < 1e-4
