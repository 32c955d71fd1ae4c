"""A request is read once, into its plan (sdtrt/requests/plan.py), and every later hop takes the plan's parts:
the loop its schedules and sizes, the tokenizer model a text's weighted pieces, the client the infotexts."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from sdtrt.contract.errors import InvalidRequest
from sdtrt.requests import plan as plan_module
from sdtrt.requests.plan import plan_request, validate
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest

PROMPT = "a (red:1.3) [cat:dog:0.5] AND a fox in snow :0.7"


def test_the_plan_holds_the_passes_their_schedules_and_each_text_pair_once(local_pipeline):
    spec = local_pipeline.spec
    plan = plan_request(Txt2ImgRequest(prompt=PROMPT, negative_prompt="[blurry:sharp:8]", steps=10, width=64,
                                       height=64, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=4, seed=-1), spec)
    assert plan.request.seed >= 0 and plan.seeds == (plan.request.seed,)  # -1 picked, once
    assert (plan.first.width, plan.first.height, plan.first.steps) == (64, 64, 10)
    assert (plan.hires.width, plan.hires.height, plan.hires.steps) == (128, 128, 4)
    assert plan.first.prompts.weights == (1.0, 0.7)  # the AND subprompts' weights
    # the first pass: cat until step 5, dog after; the negative switches after step 8
    assert [last for last, _ in plan.first.prompts.entries] == [5, 8, 10]
    firsts = [plan.texts[indices[0]] for _, indices in plan.first.prompts.entries]
    assert [p.prompt for p in firsts] == [(("a ", 1.0), ("red", 1.3), (" cat", 1.0)),
                                          (("a ", 1.0), ("red", 1.3), (" dog", 1.0)),
                                          (("a ", 1.0), ("red", 1.3), (" dog", 1.0))]
    assert [p.negative for p in firsts] == [(("blurry", 1.0),), (("blurry", 1.0),), (("sharp", 1.0),)]
    # the hires pass counts on from the first: everything already switched, its pairs shared with the first's
    assert all(set(indices) <= set(i for _, ind in plan.first.prompts.entries for i in ind)
               for _, indices in plan.hires.prompts.entries)
    # (cat, blurry), (fox, blurry), (dog, blurry), (dog, sharp), (fox, sharp): each pair once, for both passes
    assert len(plan.texts) == len(set(plan.texts)) == 5
    assert not plan.img2img and plan.images is None and plan.loras == () and plan.embeddings == ()


def test_each_text_is_parsed_once_however_many_steps_and_passes_use_it(local_pipeline, monkeypatch):
    parsed = []
    original = plan_module.emphasis_pieces

    def counting(text, field="prompt", emphasis="Original"):
        parsed.append(text)
        return original(text, field, emphasis)

    monkeypatch.setattr(plan_module, "emphasis_pieces", counting)
    plan_request(Txt2ImgRequest(prompt="[cat|dog] on a sofa", negative_prompt="blurry", steps=30, width=64,
                                height=64, enable_hr=True, hr_scale=1.5), local_pipeline.spec)
    assert sorted(parsed) == sorted(["cat on a sofa", "dog on a sofa", "blurry"])  # 60 steps, 3 texts


def test_validate_refuses_what_the_plan_would_and_names_the_field(local_pipeline):
    spec = local_pipeline.spec
    with pytest.raises(InvalidRequest) as refused:
        validate(Txt2ImgRequest(prompt="a <lora:nowhere:1> cat"), spec)
    assert refused.value.field == "prompt" and "nowhere" in str(refused.value)
    with pytest.raises(InvalidRequest) as refused:
        validate(Txt2ImgRequest(prompt="a cat", negative_prompt="(" * 200 + "x"), spec)
    assert refused.value.field == "negative_prompt"
    assert validate(Txt2ImgRequest(prompt="a cat", seed=-1), spec).seed == -1  # checked, not planned: seeds stay


def test_an_img2img_plan_prepares_its_pictures(local_pipeline):
    picture = np.full((64, 64, 3), 120, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    plan = plan_request(Img2ImgRequest(prompt="a door", width=64, height=64), local_pipeline.spec, picture, mask)
    assert plan.img2img and plan.inpaint and tuple(plan.images.init.shape) == (1, 3, 64, 64)
    assert plan.hires is None  # img2img has no hires pass
    with pytest.raises(InvalidRequest, match="init_image"):
        plan_request(Img2ImgRequest(prompt="a door"), local_pipeline.spec)


def _tokenize(server, texts: list[str], weights: list[float], negative: int):
    def tensor(name, array, wire):
        t = grpcclient.InferInput(name, list(array.shape), wire)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("piece_texts", np.array([t.encode() for t in texts], dtype=np.object_), "BYTES"),
              tensor("piece_weights", np.array(weights, dtype=np.float32), "FP32"),
              tensor("negative_pieces", np.array([negative], dtype=np.int32), "INT32")]
    client = grpcclient.InferenceServerClient(server.url)
    try:
        return client.infer("default__tokenizer", inputs)
    finally:
        client.close()


def test_the_served_tokenizer_takes_weighted_pieces_and_parses_nothing_again(server, local_pipeline):
    tokenizer = local_pipeline.tokenizer
    response = _tokenize(server, ["blurry", "a ", "(cat:1.5)"], [1.0, 1.0, 2.0], negative=1)
    ids, weights = response.as_numpy("token_ids"), response.as_numpy("token_weights")
    assert ids.shape == weights.shape == (2, 77)  # the negative prompt's chunk, then the prompt's
    literal = tokenizer("(cat:1.5)", add_special_tokens=False).input_ids
    prompt_ids = ids[1, 1:].tolist()
    assert prompt_ids[1:1 + len(literal)] == literal  # the brackets are text here: the plan already read them
    assert weights[1, 1] == 1.0 and set(weights[1, 2:2 + len(literal)]) == {2.0}  # each piece's own weight
    assert set(weights[0, 1:3]) == {1.0}


def test_the_served_tokenizer_refuses_pieces_that_do_not_add_up_naming_the_input(server):
    with pytest.raises(Exception) as refused:
        _tokenize(server, ["a", "b"], [1.0, 1.0], negative=3)
    assert "negative_pieces" in str(refused.value) and "from 0 to 2" in str(refused.value)
    with pytest.raises(Exception) as refused:
        _tokenize(server, ["a", "b"], [1.0, float("nan")], negative=1)
    assert "piece_weights" in str(refused.value)
    assert _tokenize(server, [""], [1.0], negative=0).as_numpy("token_ids").shape == (2, 77)  # still serving
