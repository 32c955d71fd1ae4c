"""A1111 prompt syntax: parsing, chunking, weighted embeddings, Clip skip, long prompts, against torch/diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import MAX_PIXEL_DIFF, diffusers_images, max_diff, reference_scheduler
from sdtrt.contract.errors import InvalidRequest
from sdtrt.export.networks.descriptors import final_layer_norm
from sdtrt.requests.prompts import chunk_prompt, parse_prompt_attention, prompt_rows
from sdtrt.requests.request import Txt2ImgRequest

# A1111's own examples of its parser (modules/prompt_parser.py), plus BREAK and edge cases.
PARSE_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("((x))", [("x", 1.21)]),
    ("[tree]", [("tree", 1 / 1.1)]),
    ("[[tree]]", [("tree", 1 / 1.21)]),
    ("(x:1.3) y", [("x", 1.3), (" y", 1.0)]),
    ("(x:0.25)", [("x", 0.25)]),
    ("((x:1.5))", [("x", 1.65)]),
    ("a:b, c", [("a:b, c", 1.0)]),
    ("\\\\back", [("\\back", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a, BREAK (b)", [("a,", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),  # A1111 keeps the empty piece
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text,expected", PARSE_TABLE)
def test_parse_like_a1111(text, expected):
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


@pytest.fixture(scope="module")
def tokenizer(local_pipeline):
    return local_pipeline.tokenizer


def test_chunks_are_bos_75_tokens_eos(tokenizer):
    chunks = chunk_prompt(tokenizer, " ".join(["cat"] * 120), max_chunks=3)
    cat = tokenizer.convert_tokens_to_ids("cat</w>")
    assert chunks.ids.shape == (2, 77) and chunks.tokens == 120
    assert (chunks.ids[:, 0] == 49406).all() and (chunks.ids[:, 76] == 49407).all()
    assert (chunks.ids[0, 1:76] == cat).all()
    assert (chunks.ids[1, 1:46] == cat).all() and (chunks.ids[1, 46:] == 49407).all()


def test_weights_follow_the_brackets(tokenizer):
    chunks = chunk_prompt(tokenizer, "a (red:1.5) [fox]", max_chunks=1)
    red, fox = tokenizer.convert_tokens_to_ids(["red</w>", "fox</w>"])
    ids, weights = list(chunks.ids[0]), chunks.weights[0]
    assert weights[ids.index(red)] == pytest.approx(1.5)
    assert weights[ids.index(fox)] == pytest.approx(1 / 1.1)
    assert weights[0] == 1.0 and (weights[5:] == 1.0).all()


def test_break_starts_a_new_chunk(tokenizer):
    chunks = chunk_prompt(tokenizer, "a red fox BREAK a blue sky", max_chunks=3)
    assert chunks.ids.shape == (2, 77)
    assert list(chunks.ids[1, 1:4]) == tokenizer("a blue sky", add_special_tokens=False).input_ids


def test_full_chunk_is_cut_at_a_recent_comma(tokenizer):
    chunks = chunk_prompt(tokenizer, " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10), max_chunks=3)
    comma, dog = tokenizer.convert_tokens_to_ids([",</w>", "dog</w>"])
    assert chunks.ids[0, 71] == comma and (chunks.ids[0, 72:] == 49407).all()
    assert (chunks.ids[1, 1:11] == dog).all() and chunks.ids[1, 11] == 49407


def test_too_long_prompt_names_the_field_and_limit(tokenizer):
    with pytest.raises(InvalidRequest) as exc:
        prompt_rows(tokenizer, "ok", " ".join(["cat"] * 300), max_chunks=3)
    assert exc.value.field == "negative_prompt" and "at most 3 chunks of 75 tokens" in str(exc.value)


def test_prompt_and_negative_are_padded_to_the_same_chunks(tokenizer):
    ids, weights = prompt_rows(tokenizer, " ".join(["cat"] * 120), "blurry", max_chunks=3)
    assert ids.shape == weights.shape == (4, 77)
    empty = tokenizer("", padding="max_length", max_length=77).input_ids
    assert list(ids[1]) == empty  # negative: "blurry", then one empty-prompt chunk


def torch_embeddings(pipe, tokenizer, prompt: str, negative: str, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's conditioning computed directly with the torch text encoder, for (negative, prompt)."""
    ids, weights = prompt_rows(tokenizer, prompt, negative, max_chunks=3)
    with torch.no_grad():
        out = pipe.text_encoder(torch.from_numpy(ids).long(), output_hidden_states=True)
        z = final_layer_norm(pipe.text_encoder)(out.hidden_states[-clip_skip])
    w = torch.from_numpy(weights)[..., None]
    means = z.mean(dim=(1, 2), keepdim=True)
    z = z * w
    z = z * (means / z.mean(dim=(1, 2), keepdim=True))
    k = len(ids) // 2
    return z[:k].reshape(1, -1, z.shape[-1]), z[k:].reshape(1, -1, z.shape[-1])


WEIGHTED = "a ((lighthouse)) on a [cliff], (stormy sea:1.4), dramatic light BREAK oil painting"


@pytest.mark.parametrize("prompt,clip_skip", [(WEIGHTED, 1), (WEIGHTED, 2), (" ".join(["red fox"] * 60), 1)])
def test_embeddings_match_a_direct_torch_computation(local_pipeline, diffusers_pipe, tokenizer, prompt, clip_skip):
    request = Txt2ImgRequest(prompt=prompt, negative_prompt="(blurry:1.2)", clip_skip=clip_skip)
    uncond, cond = (c["encoder_hidden_states"] for c in local_pipeline.encode_prompts(request))
    expected_uncond, expected_cond = torch_embeddings(diffusers_pipe, tokenizer, prompt, "(blurry:1.2)", clip_skip)
    assert cond.shape == expected_cond.shape and uncond.shape == expected_uncond.shape
    assert torch.abs(cond - expected_cond).max() < 1e-4 and torch.abs(uncond - expected_uncond).max() < 1e-4


def test_weighted_long_prompt_image_matches_diffusers_with_those_embeddings(local_pipeline, diffusers_pipe, tokenizer):
    prompt = WEIGHTED + ", " + " ".join(["highly detailed"] * 40)  # > 75 tokens: 3 chunks with the BREAK
    uncond, cond = torch_embeddings(diffusers_pipe, tokenizer, prompt, "", clip_skip=2)
    assert cond.shape[1] == 3 * 77
    original = diffusers_pipe.scheduler
    diffusers_pipe.scheduler = reference_scheduler("Euler a", original.config, 11)
    try:
        expected = diffusers_pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=8,
                                  guidance_scale=7.0, width=64, height=64, output_type="np",
                                  generator=torch.Generator("cpu").manual_seed(11)).images
    finally:
        diffusers_pipe.scheduler = original
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt=prompt, sampler="Euler a", steps=8, guidance_scale=7.0,
                                                   seed=11, width=64, height=64, clip_skip=2))
    assert max_diff(result.images, (expected * 255).round().astype(np.uint8)) <= MAX_PIXEL_DIFF
    assert "Clip skip: 2" in result.infotexts[0]


def test_plain_prompt_is_unchanged_by_weighting(local_pipeline, diffusers_pipe):
    """No brackets, one chunk: exactly diffusers' own text encoding (the existing parity holds)."""
    expected = diffusers_images(diffusers_pipe, prompt="a red fox", negative_prompt="blurry", sampler="Euler",
                                steps=6, cfg=7.0, seed=3, width=64, height=64)
    result = local_pipeline.txt2img(Txt2ImgRequest(prompt="a red fox", negative_prompt="blurry", sampler="Euler",
                                                   steps=6, guidance_scale=7.0, seed=3, width=64, height=64))
    assert max_diff(result.images, expected) <= MAX_PIXEL_DIFF


def _clip_row(pipe, tokenizer, ids: list[int], multipliers: list[float]) -> torch.Tensor:
    """One chunk as A1111's tokenize_line pads it (BOS, the tokens, EOS to 77) through the torch text encoder,
    times its multipliers (A1111's emphasis "No norm"; all 1 for Ignore and None)."""
    fill = 77 - 1 - len(ids)
    row = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] * fill
    with torch.no_grad():
        z = pipe.text_encoder(torch.tensor([row])).last_hidden_state[0]
    return z * torch.tensor([1.0] + multipliers + [1.0] * fill)[:, None]


@pytest.mark.parametrize("emphasis", ["No norm", "Ignore", "None"])
def test_emphasis_modes_weigh_as_a1111s(local_pipeline, diffusers_pipe, tokenizer, emphasis):
    """A1111's sd_emphasis: No norm multiplies without restoring the mean, Ignore parses the brackets and weighs
    nothing, None tokenizes the brackets as text (tokenize_line's [[line, 1.0]])."""
    prompt = "a (red:1.5) fox"

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    if emphasis == "None":
        ids, multipliers = tokens(prompt), [1.0] * len(tokens(prompt))
    else:  # A1111 tokenizes each parsed piece on its own
        pieces = [("a ", 1.0), ("red", 1.5 if emphasis == "No norm" else 1.0), (" fox", 1.0)]
        ids = [t for text, _ in pieces for t in tokens(text)]
        multipliers = [w for text, w in pieces for _ in tokens(text)]
    expected = _clip_row(diffusers_pipe, tokenizer, ids, multipliers)
    cond = local_pipeline.encode_prompts(Txt2ImgRequest(prompt=prompt, emphasis=emphasis))[1]["encoder_hidden_states"]
    assert torch.abs(cond[0] - expected).max() < 1e-4
    original = local_pipeline.encode_prompts(Txt2ImgRequest(prompt=prompt))[1]["encoder_hidden_states"]
    assert torch.abs(original[0] - expected).max() > 1e-3


def test_no_norm_leaves_the_padding_chunks_unweighted(local_pipeline, diffusers_pipe, tokenizer):
    """The negative prompt padded to the prompt's chunks: its padding is the empty prompt's encoding as is."""
    request = Txt2ImgRequest(prompt="(tree:1.3) " * 80, negative_prompt="", emphasis="No norm")
    uncond = local_pipeline.encode_prompts(request)[0]["encoder_hidden_states"]
    assert uncond.shape[1] == 2 * 77
    empty = _clip_row(diffusers_pipe, tokenizer, [], [])
    assert torch.abs(uncond[0, 77:] - empty).max() < 1e-4 and torch.abs(uncond[0, :77] - empty).max() < 1e-4


def test_emphasis_served_matches_the_local_runner_and_is_written(server, local_pipeline):
    from reference import max_diff as diff
    from sdtrt.client import Client

    settings = dict(steps=4, seed=5, width=64, height=64, emphasis="No norm", negative_prompt="[blurry]")
    served = Client(server.url).txt2img("a ((lighthouse:1.4))", **settings)
    local = local_pipeline.txt2img(Txt2ImgRequest(prompt="a ((lighthouse:1.4))", **settings))
    assert diff(served.images, local.images) <= MAX_PIXEL_DIFF
    assert "Emphasis: No norm" in served.infotexts[0]
    plain = local_pipeline.txt2img(Txt2ImgRequest(prompt="a lighthouse", steps=4, seed=5, width=64, height=64,
                                                  emphasis="No norm"))
    assert "Emphasis" not in plain.infotexts[0]  # (A1111 names it only where a text has brackets)
    long = dict(steps=2, seed=5, width=64, height=64, comma_padding_backtrack=0)  # the tokenizer model takes it
    prompt = "red " * 70 + ", " + "blue " * 10
    served = Client(server.url).txt2img(prompt, **long)
    assert diff(served.images, local_pipeline.txt2img(Txt2ImgRequest(prompt=prompt, **long)).images) <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("backtrack", [20, 3, 0])
def test_comma_padding_backtrack_cuts_a_full_chunk_at_a_recent_comma_as_a1111(local_pipeline, diffusers_pipe,
                                                                             backtrack):
    """A1111's comma_padding_backtrack: the chunk that fills up 5 tokens after a comma is cut there with 20, not
    with 3 (nor 0, which never cuts); against A1111's tokenize_line restated in tests/test_a1111_exact.py."""
    from test_a1111_exact import a1111_text

    prompt = "red " * 70 + ", " + "blue " * 10
    request = Txt2ImgRequest(prompt=prompt, comma_padding_backtrack=backtrack)
    cond = local_pipeline.encode_prompts(request)[1]["encoder_hidden_states"]
    with torch.no_grad():
        expected = a1111_text(diffusers_pipe, prompt, 1, backtrack)
    assert cond.shape == expected.shape and torch.abs(cond - expected).max() < 1e-4
    if backtrack != 20:
        with torch.no_grad():
            assert torch.abs(cond - a1111_text(diffusers_pipe, prompt, 1, 20)).max() > 1e-3
