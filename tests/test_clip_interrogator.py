"""A1111's CLIP interrogator (`sdtrt export --interrogators DIR` with BLIP's and CLIP's files): /sdapi/v1/interrogate
with model "clip" and Loopback's "CLIP", served.

The files are random-weight ones in the layouts A1111 reads, at small widths: BLIP's captioner as Salesforce's
checkpoint lays it out (``model`` -> timm's ViT names, BERT's), written here from a transformers BLIP by this test's
own renames, with a small WordPiece vocab.txt; openai's CLIP built by openai's own code (clip-anytorch's model.py,
loaded here by its path) and saved as a TorchScript archive, as openai ships it. The reference is A1111's
interrogate() restated: transformers' generate() on the BLIP model the file was written from, openai's
encode_image/encode_text on the CLIP model itself, A1111's preprocessing with PIL and its rank()."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from reference import sample_picture
from servers import triton_on
from sdtrt.client import Client
from sdtrt.client.apps.a1111_api import create_app

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "cat", "dog", "red", "blue", "on",
         "the", "grass", "sky", ".", ",", "##s", "'", "sitting", "with", "hat", "tree", "big"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CATEGORIES = {"artists.txt": ["by Alice Artist", "by Bob Painter", "by Zdzisław Beksiński", "by Carol Drawer"],
              "flavors.txt": [f"flavor {i}" for i in range(9)] + ["", "very " * 40 + "long"],
              "mediums.top2.list.txt": ["oil painting", "a photo", "digital art"],
              "movements.txt": ["cubism", "art nouveau"]}


def openai_clip_module():
    """openai's clip/model.py (clip-anytorch), loaded by its path: its package __init__ needs torchvision."""
    path = Path(importlib.util.find_spec("clip").submodule_search_locations[0])
    found = {}
    for name in ("model", "simple_tokenizer"):
        spec = importlib.util.spec_from_file_location(f"_openai_clip_{name}", path / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[name] = module
    return found["model"], found["simple_tokenizer"]


def tiny_blip():
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(11)
    vocab = len(WORDS) + 2
    config = BlipConfig(
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                           image_size=384, patch_size=32, layer_norm_eps=1e-6, initializer_range=0.02),
        text_config=dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                         intermediate_size=96, encoder_hidden_size=64, max_position_embeddings=300,
                         bos_token_id=len(WORDS), sep_token_id=WORDS.index("[SEP]"), pad_token_id=0,
                         eos_token_id=WORDS.index("[SEP]")))
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # logits spread wide, so that no two tokens tie between onnxruntime and torch; the
        model.text_decoder.cls.predictions.decoder.weight.mul_(8)  # picture's patches outweigh the positions
        model.vision_model.embeddings.patch_embedding.weight.mul_(30)  # and the caption follows the picture
        for layer in model.text_decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(20)
    return model


def blip_original_layout(model) -> dict:
    """The HF port's weights under Salesforce BLIP's names (models/vit.py, models/med.py), as its .pth holds them."""
    renames = [("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
               ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
               ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
               ("vision_model.post_layernorm", "visual_encoder.norm"),
               ("vision_model.encoder.layers", "visual_encoder.blocks"), ("layer_norm1", "norm1"),
               ("layer_norm2", "norm2"), ("self_attn.qkv", "attn.qkv"), ("self_attn.projection", "attn.proj")]
    state = {}
    for key, value in model.state_dict().items():
        if key == "text_decoder.cls.predictions.decoder.bias":
            continue  # BLIP ties it to cls.predictions.bias
        if key.startswith("vision_model."):
            for new, old in renames:
                key = key.replace(new, old)
        state[key] = value.clone()
    return {"model": state}


def tiny_clip():
    clip_model, _ = openai_clip_module()
    torch.manual_seed(12)
    model = clip_model.CLIP(embed_dim=512, image_resolution=224, vision_layers=2, vision_width=64,
                            vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=64,
                            transformer_heads=1, transformer_layers=2)
    with torch.no_grad():  # (the picture's patches outweigh the positions, so that pictures rank lines apart)
        model.visual.conv1.weight.mul_(30)
    return model.float().eval()


@pytest.fixture(scope="module")
def models():
    return tiny_blip(), tiny_clip()


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    blip, clip = models
    out = tmp_path_factory.mktemp("clip-interrogator")
    torch.save(blip_original_layout(blip), str(out / "model_base_caption_capfilt_large.pth"))
    traced = torch.jit.trace(clip, (torch.zeros(1, 3, 224, 224), torch.zeros(2, 77, dtype=torch.long)),
                             check_trace=False)
    torch.jit.save(traced, str(out / "ViT-L-14.pt"))
    (out / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (out / "interrogate").mkdir()
    for name, lines in CATEGORIES.items():
        (out / "interrogate" / name).write_text("\n".join(lines) + "\n", encoding="utf8")
    return out


@pytest.fixture(scope="module")
def repo(export_default, folder):
    return export_default("clip-interrogator-repo", interrogator_dir=folder, allow_pickle=True)


# --- the reference: A1111's interrogate(), restated -------------------------------------------------------------

def _tensor(picture: Image.Image) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)
    return ((array - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)).unsqueeze(0)


def reference_caption(blip, vocab: Path, picture: Image.Image, beams=1, min_length=24, max_length=48,
                      **generate) -> str:
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=str(vocab), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    ids = tokenizer(["a picture of "], return_tensors="pt").input_ids
    pixels = _tensor(picture.resize((384, 384), resample=Image.Resampling.BICUBIC))
    with torch.no_grad():
        out = blip.generate(pixel_values=pixels, input_ids=ids, num_beams=beams, min_length=min_length,
                            max_length=max_length, do_sample=False, repetition_penalty=1.0, **generate)
    text = tokenizer.decode(out[0], skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return text[len("a picture of "):]


def clip_preprocess(picture: Image.Image) -> torch.Tensor:
    """openai's _transform(224): Resize(224) bicubic (torchvision's sizes), CenterCrop(224), RGB, ToTensor, Normalize."""
    w, h = picture.size
    if w <= h:
        size = (224, int(224 * h / w))
    else:
        size = (int(224 * w / h), 224)
    resized = picture.resize(size, resample=Image.Resampling.BICUBIC)
    top, left = int(round((resized.height - 224) / 2.0)), int(round((resized.width - 224) / 2.0))
    return _tensor(resized.crop((left, top, left + 224, top + 224)).convert("RGB"))


def tokenize(lines: list[str]) -> torch.Tensor:
    """clip.tokenize(lines, truncate=True), as openai's clip.py writes it."""
    _, simple = openai_clip_module()
    tokenizer = simple.SimpleTokenizer()
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    result = torch.zeros(len(lines), 77, dtype=torch.long)
    for i, line in enumerate(lines):
        tokens = [sot] + tokenizer.encode(line) + [eot]
        if len(tokens) > 77:
            tokens = tokens[:77]
            tokens[-1] = eot
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result


def a1111_interrogate(models, vocab: Path, picture: Image.Image, dict_limit=1500, skip=(), ranks=False,
                      **caption) -> str:
    blip, clip = models
    res = reference_caption(blip, vocab, picture, **caption)
    with torch.no_grad():
        image_features = clip.encode_image(clip_preprocess(picture))
        image_features /= image_features.norm(dim=-1, keepdim=True)
        for name in sorted(CATEGORIES):
            stem = name[:-len(".txt")]
            if stem in skip:
                continue
            found = re.search(r"\.top(\d+)\.", stem)
            top = 1 if found is None else int(found.group(1))
            text_array = CATEGORIES[name]
            if dict_limit != 0:
                text_array = text_array[0:int(dict_limit)]
            top = min(top, len(text_array))
            text_features = clip.encode_text(tokenize(text_array))
            text_features /= text_features.norm(dim=-1, keepdim=True)
            similarity = (100.0 * image_features @ text_features.T).softmax(dim=-1)
            probs, labels = similarity.topk(top, dim=-1)
            for i in range(top):
                match, score = text_array[labels[0][i]], float(probs[0][i]) * 100
                res += f", ({match}:{score / 100:.3f})" if ranks else f", {match}"
    return res


def _png(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- tests ----------------------------------------------------------------------------------------------------

def _red(width: int, height: int) -> Image.Image:
    return Image.fromarray((sample_picture(width, height) * np.array([1.0, 0.25, 0.25])).astype(np.uint8))


def test_the_caption_and_the_ranked_lines_are_a1111s(repo, folder, models, tmp_path):
    vocab = folder / "vocab.txt"
    wide, tall = Image.fromarray(sample_picture(96, 64)), _red(48, 80)
    with triton_on(repo, tmp_path) as triton:
        client = Client(triton.url)
        assert sorted(client.interrogators()) == ["clip"]
        api = TestClient(create_app(client))
        captions = []
        for picture in (wide, tall):
            response = api.post("/sdapi/v1/interrogate", json={"image": _png(picture), "model": "clip"})
            assert response.status_code == 200, response.text[:500]
            expected = a1111_interrogate(models, vocab, picture)
            assert response.json() == {"caption": expected}, (response.json(), expected)
            captions.append(expected.split(", ")[0])
        assert captions[0] != captions[1] and all(len(c) > 10 for c in captions), captions  # (the picture counts)
        from sdtrt.client.apps.ui import Page  # (the page's Interrogate CLIP button: the picture's caption)

        page = Page(client, tmp_path / "outputs", None)
        assert page.interrogate_handler("clip", {"background": np.asarray(tall), "layers": []}) == expected
        options = {"interrogate_return_ranks": True, "interrogate_clip_dict_limit": 3,
                   "interrogate_clip_skip_categories": ["movements"], "interrogate_clip_min_length": 6,
                   "interrogate_clip_max_length": 12}
        assert api.post("/sdapi/v1/options", json=options).status_code == 200
        ranked = api.post("/sdapi/v1/interrogate", json={"image": _png(tall), "model": "clip"}).json()
        assert ranked["caption"] == a1111_interrogate(models, vocab, tall, dict_limit=3, skip=("movements",),
                                                      ranks=True, min_length=6, max_length=12)
        assert "flavor 3" not in ranked["caption"] and "cubism" not in ranked["caption"]
        for key, value in (("interrogate_clip_num_beams", 17), ("interrogate_clip_max_length", 0),
                           ("interrogate_clip_dict_limit", -1)):
            assert api.post("/sdapi/v1/options", json={key: value}).status_code == 200
            refused = api.post("/sdapi/v1/interrogate", json={"image": _png(tall), "model": "clip"})
            assert refused.status_code == 422 and key in refused.text, refused.text
            assert api.post("/sdapi/v1/options", json={**options, "interrogate_clip_num_beams": 1}).status_code == 200
        body = {"prompt": "a castle", "seed": 5, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
                "init_images": [_png(wide.resize((64, 64)))], "denoising_strength": 0.5, "script_name": "loopback",
                "script_args": [2, 0.4, "Linear", "CLIP"]}
        looped = api.post("/sdapi/v1/img2img", json=body)
        assert looped.status_code == 200, looped.text[:500]
        infotexts = json.loads(looped.json()["info"])["infotexts"]
        first = a1111_interrogate(models, vocab, wide.resize((64, 64)), dict_limit=3, skip=("movements",),
                                  ranks=True, min_length=6, max_length=12)
        assert infotexts[1].startswith(f"a castle, {first}\n")  # (the grid first, then each loop's picture)


def test_beam_search_keeps_the_likeliest_captions(models, folder):
    """sdtrt's beam search, on the torch decoder, against transformers' with no length penalty (where today's
    generate() and A1111's 4.30 agree: finished captions by their summed log-probability, stopping once no running
    beam can beat the worst of them)."""
    from sdtrt.postprocessing.clip_interrogate import Words, beam_caption
    from transformers import BertTokenizer

    blip, _ = models
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    prompt = tokenizer("a picture of ").input_ids
    words = Words(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), [len(WORDS), *prompt[1:-1]],
                  tokenizer.sep_token_id, frozenset(tokenizer.all_special_ids))
    for picture, beams, lengths in ((_red(48, 80), 3, (6, 12)), (Image.fromarray(sample_picture(96, 64)), 4, (5, 9))):
        pixels = _tensor(picture.resize((384, 384), resample=Image.Resampling.BICUBIC))
        with torch.no_grad():
            embeds = blip.vision_model(pixel_values=pixels).last_hidden_state

            def decode(ids: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    rows = torch.from_numpy(ids)
                    return blip.text_decoder(input_ids=rows, encoder_hidden_states=embeds.expand(len(rows), -1, -1)
                                             ).logits[:, -1].numpy()

            ids = torch.tensor([prompt])
            want = blip.generate(pixel_values=pixels, input_ids=ids, num_beams=beams, min_length=lengths[0],
                                 max_length=lengths[1], length_penalty=0.0, early_stopping=False)[0].tolist()
        got = beam_caption(decode, words, beams, *lengths, length_penalty=0.0)
        want = [t for t in want if t != tokenizer.pad_token_id]
        assert got == want[:len(got)] and want[len(got):] in ([], [words.sep]), (got, want)


def test_wrong_or_missing_files_are_named(default_model, folder, tmp_path):
    from sdtrt.contract.errors import UsageError
    from sdtrt.export import export_model

    def export(where: Path, **options):
        export_model(default_model, tmp_path / "repo", progress=False, report=lambda *_: None,
                     interrogator_dir=where, **options)

    with pytest.raises(UsageError, match="TorchScript archive .* --allow-pickle"):
        export(folder)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model_base_caption_capfilt_large.pth").write_bytes((folder / "model_base_caption_capfilt_large.pth")
                                                               .read_bytes())
    with pytest.raises(UsageError, match="needs both BLIP and CLIP; it has BLIP .* but no CLIP"):
        export(lone)
    torch.save({"weight": torch.zeros(2)}, str(lone / "other.pt"))
    with pytest.raises(UsageError, match="other.pt: neither A1111's DeepBooru"):
        export(lone)


def test_the_words_are_decoded_as_berts_tokenizer_decodes_them(folder):
    from sdtrt.postprocessing.clip_interrogate import Words, category_topn
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    words = Words(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), [], tokenizer.sep_token_id,
                  frozenset(tokenizer.all_special_ids))
    rng = np.random.RandomState(4)
    for _ in range(200):
        ids = rng.randint(0, len(tokenizer), size=rng.randint(1, 12)).tolist()
        assert words.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert [category_topn(s) for s in ("flavors", "flavors.top3", "mediums.top2.list", "a.top12.b")] == [1, 1, 2, 12]


def test_clip_preprocessing_is_openais(models):
    """CLIP's picture as openai's _transform(224) makes it, and BLIP's as A1111's transforms do (restated above)."""
    from sdtrt.postprocessing.clip_interrogate import blip_picture, clip_picture

    for w, h in ((96, 64), (48, 80), (300, 300), (225, 1000)):
        picture = Image.fromarray(sample_picture(w, h))
        assert np.allclose(clip_picture(picture, 224), clip_preprocess(picture).numpy(), atol=1e-6)
        blip = _tensor(picture.resize((384, 384), resample=Image.Resampling.BICUBIC)).numpy()
        assert np.allclose(blip_picture(picture, 384), blip, atol=1e-6)


def test_its_tensorrt_profiles_and_batching(repo):
    """On a GPU: BLIP's decoder takes 1..16 beams of up to the caption's longest, one picture's tokens, and Triton
    does not batch it; CLIP's text network takes up to 128 rows a call, batched."""
    from sdtrt.export.tensorrt import EngineOptions, profile_shapes
    from sdtrt.model_repository.configs import engine_batching
    from sdtrt.pipeline.local import LocalPipeline

    spec = LocalPipeline(repo).spec
    decoder = spec.component("interrogator_blip_decoder")
    profile = profile_shapes(spec, decoder, EngineOptions())
    assert profile["ids"] == [(1, 1), (1, 24), (16, 256)] and profile["tokens"] == [(1, 145, 64)] * 3
    assert engine_batching(spec, decoder, profile).max_batch_size == 0
    text = spec.component("interrogator_clip_text")
    assert engine_batching(spec, text, profile_shapes(spec, text, EngineOptions())).max_batch_size == 128
