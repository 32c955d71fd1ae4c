"""A1111's CLIP interrogator from the files A1111 reads (``sdtrt export --interrogators DIR``):

- BLIP's captioner, ``model_base_caption_capfilt_large.pth`` (Salesforce's layout: ``model`` -> ``visual_encoder.``
  a timm ViT, ``text_decoder.`` a BERT with cross-attention), built as transformers' BLIP port with its keys
  renamed and BLIP's own LayerNorm epsilon (timm's 1e-6) in the ViT;
- bert-base-uncased's ``vocab.txt`` beside it (BLIP's tokenizer, with BLIP's ``[DEC]`` and ``[ENC]`` added);
- openai CLIP ViT-L/14, ``ViT-L-14.pt`` (openai's TorchScript archive, read with --allow-pickle, or its state dict
  as .safetensors), built by openai's own ``clip.model.build_model`` as A1111's ``clip.load`` builds it;
- the category files, ``interrogate/*.txt`` (A1111's models/interrogate: artists, flavors, mediums, movements).

They become four networks (sdtrt.contract.spec: BLIP_VISION, BLIP_DECODER, CLIP_IMAGE, CLIP_TEXT). CLIP's text
network holds every category line's tokens (openai's tokenizer, truncated at 77 as A1111 asks) and takes rows;
the spec's entry holds the lines, BLIP's vocabulary and prompt, for sdtrt.postprocessing.clip_interrogate.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
import types
import zipfile
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import (BLIP_DECODER, BLIP_VISION, CAPTION_LENGTH, CAPTION_ROWS, CAPTION_TOKENS,
                                 CLIP_IMAGE, CLIP_TEXT, CLIP_TEXTS, SINGLE, TensorSpec, interrogator_component)
from sdtrt.export.networks.checkpoint import file_sha256, read_weights
from sdtrt.export.networks.descriptors import Descriptor, OnePerCall
from sdtrt.pipeline.ksampling import unexecuted_package
from sdtrt.postprocessing.clip_interrogate import BLIP_PROMPT, category_topn

_LOCK = threading.Lock()
VOCAB_FILE, CATEGORIES = "vocab.txt", "interrogate"
_BLIP_PARTS = ("visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
               "text_decoder.bert.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight")
_CLIP_PARTS = ("visual.proj", "visual.conv1.weight", "token_embedding.weight", "text_projection", "ln_final.weight")
# Salesforce BLIP's ViT (timm's names) -> transformers' BLIP port; its text decoder keeps BERT's names
_VIT_RENAMES = (("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
                ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
                ("visual_encoder.patch_embed.proj", "vision_model.embeddings.patch_embedding"),
                ("visual_encoder.norm.", "vision_model.post_layernorm."),
                ("visual_encoder.blocks.", "vision_model.encoder.layers."),
                (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."),
                (".attn.qkv.", ".self_attn.qkv."), (".attn.proj.", ".self_attn.projection."))


def is_blip(state: object) -> bool:
    state = state.get("model", state) if isinstance(state, dict) else state
    return isinstance(state, dict) and all(k in state for k in _BLIP_PARTS)


def is_torchscript(path: Path) -> bool:
    """openai's CLIP files are TorchScript archives: a zip holding compiled code beside the weights."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def is_clip(state: object) -> bool:
    return isinstance(state, dict) and all(k in state for k in _CLIP_PARTS)


def read_interrogator_file(path: Path, allow_pickle: bool) -> object:
    """What an interrogator file holds: a TorchScript archive's weights (openai's CLIP; loading one runs its code,
    so only with --allow-pickle), else read_weights'."""
    if not is_torchscript(path):
        return read_weights(path, allow_pickle, "--interrogators")
    if not allow_pickle:
        raise UsageError(f"--interrogators {path}: a TorchScript archive (openai's CLIP), whose loading runs the "
                         "code it holds: pass --allow-pickle for a file you trust, or save its state_dict() as "
                         ".safetensors")
    return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def openai_clip() -> tuple[types.ModuleType, types.ModuleType]:
    """openai CLIP's ``model`` and ``simple_tokenizer`` modules (clip-anytorch), without the package's __init__,
    whose preprocessing imports torchvision."""
    with _LOCK:
        unexecuted_package("clip", "clip-anytorch==2.6.0 ftfy", "openai's CLIP code (clip-anytorch)")
        return importlib.import_module("clip.model"), importlib.import_module("clip.simple_tokenizer")


def blip_model(state: dict[str, torch.Tensor], path: Path) -> BlipForConditionalGeneration:
    """transformers' BLIP with the file's weights, its sizes read from them (heads: 64 wide, as ViT-B and BERT)."""
    state = state.get("model", state)
    pos, vit_layers = state["visual_encoder.pos_embed"], {k.split(".")[2] for k in state if k.startswith("visual_encoder.blocks.")}
    patch, width = state["visual_encoder.patch_embed.proj.weight"].shape[-1], pos.shape[-1]
    words = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    text_layers = {k.split(".")[4] for k in state if k.startswith("text_decoder.bert.encoder.layer.")}
    vision = dict(hidden_size=width, intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=len(vit_layers), num_attention_heads=max(1, width // 64), patch_size=patch,
                  image_size=patch * round((pos.shape[1] - 1) ** 0.5), layer_norm_eps=1e-6)
    text = dict(vocab_size=words.shape[0], hidden_size=words.shape[1], num_hidden_layers=len(text_layers),
                num_attention_heads=max(1, words.shape[1] // 64), encoder_hidden_size=width,
                intermediate_size=state["text_decoder.bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=state["text_decoder.bert.embeddings.position_embeddings.weight"].shape[0])
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text)).eval()
    renamed = {}
    for key, value in state.items():
        if key.startswith(("visual_encoder.", "text_decoder.")) and "position_ids" not in key:
            for old, new in _VIT_RENAMES if key.startswith("visual_encoder.") else ():
                key = key.replace(old, new)
            renamed[key] = value
    renamed.setdefault("text_decoder.cls.predictions.decoder.bias", renamed.get("text_decoder.cls.predictions.bias"))
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise UsageError(f"--interrogators {path}: not BLIP's captioner as A1111 loads it (missing "
                         f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'})")
    return model


def blip_words(folder: Path, vocab_size: int) -> dict:
    """BLIP's tokenizer as its init_tokenizer makes it from bert-base-uncased: the spec's words (the vocabulary,
    the prompt's ids with [DEC] first and the separator dropped, the separator, the ids decode() skips)."""
    path = folder / VOCAB_FILE
    if not path.is_file():
        raise UsageError(f"--interrogators {folder}: BLIP needs bert-base-uncased's {VOCAB_FILE} beside it (the "
                         "tokenizer A1111's BLIP downloads)")
    tokenizer = BertTokenizer(vocab=str(path), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise UsageError(f"--interrogators {path}: {len(tokenizer) - 2} words, but the BLIP file's decoder has "
                         f"{vocab_size - 2} (+ [DEC] and [ENC]): give bert-base-uncased's {VOCAB_FILE}")
    prompt = tokenizer(BLIP_PROMPT).input_ids
    prompt[0] = tokenizer.bos_token_id
    return {"vocab": tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), "prompt": prompt[:-1],
            "sep": tokenizer.sep_token_id, "special": sorted(tokenizer.all_special_ids)}


def read_categories(folder: Path) -> list[dict]:
    """A1111's categories: each ``interrogate/*.txt`` (by name), its lines stripped, its top n from its name."""
    found, first = [], 0
    for path in sorted((folder / CATEGORIES).glob("*.txt")) if (folder / CATEGORIES).is_dir() else ():
        with open(path, encoding="utf8") as file:
            lines = [line.strip() for line in file.readlines()]
        found.append({"name": path.stem, "topn": category_topn(path.stem), "lines": lines, "first": first})
        first += len(lines)
    return found


def clip_tokens(lines: list[str], context: int) -> torch.Tensor:
    """clip.tokenize(lines, context, truncate=True): [start] + BPE + [end], cut to the model's context (77) with
    the end kept, zero padded."""
    tokenizer = openai_clip()[1].SimpleTokenizer()
    start, end = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    table = torch.zeros(max(1, len(lines)), context, dtype=torch.int32)
    for row, line in enumerate(lines):
        tokens = [start, *tokenizer.encode(line), end]
        if len(tokens) > context:
            tokens = tokens[:context - 1] + [end]
        table[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
    return table


class BlipVision(nn.Module):
    def __init__(self, model: BlipForConditionalGeneration):
        super().__init__()
        self.vision = model.vision_model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=image).last_hidden_state


class BlipDecoder(nn.Module):
    """The next token's logits for each row of ids, all rows reading the one picture's ViT tokens (as BLIP's
    generate() repeats them for its beams)."""

    def __init__(self, model: BlipForConditionalGeneration):
        super().__init__()
        self.decoder = model.text_decoder

    def forward(self, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.expand(ids.shape[0], -1, -1)
        out = self.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=tokens,
                           use_cache=False, return_dict=True)
        return out.logits[:, -1, :]


class ClipImage(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.clip.encode_image(image)
        return features / features.norm(dim=-1, keepdim=True)


class ClipText(nn.Module):
    """CLIP's unit text features of the category lines at ``rows`` (their tokens are this network's table)."""

    def __init__(self, clip: nn.Module, table: torch.Tensor):
        super().__init__()
        self.clip = clip
        self.register_buffer("table", table)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        features = self.clip.encode_text(self.table[rows].long())
        return features / features.norm(dim=-1, keepdim=True)


def clip_descriptors(blip: BlipForConditionalGeneration, clip: nn.Module, table: torch.Tensor) -> list[Descriptor]:
    vision = blip.config.vision_config
    size, tokens = vision.image_size, (vision.image_size // vision.patch_size) ** 2 + 1
    vocab, side, dim = blip.config.text_config.vocab_size, clip.visual.input_resolution, clip.text_projection.shape[1]
    rows = table.shape[0]
    return [
        OnePerCall(interrogator_component(BLIP_VISION), BlipVision(blip).eval(),
                   (TensorSpec("image", "float32", (SINGLE, 3, size, size)),),
                   (TensorSpec("tokens", "float32", (SINGLE, tokens, vision.hidden_size)),),
                   lambda dims: (torch.randn(1, 3, size, size),), {}),
        OnePerCall(interrogator_component(BLIP_DECODER), BlipDecoder(blip).eval(),
                   (TensorSpec("ids", "int64", (CAPTION_ROWS, CAPTION_TOKENS)),
                    TensorSpec("tokens", "float32", (SINGLE, tokens, vision.hidden_size))),
                   (TensorSpec("logits", "float32", (CAPTION_ROWS, vocab)),),
                   lambda dims: (torch.randint(0, vocab, (dims.get(CAPTION_ROWS, 2), dims.get(CAPTION_TOKENS, 5))),
                                 torch.randn(1, tokens, vision.hidden_size)), {CAPTION_ROWS: 2, CAPTION_TOKENS: 5}),
        OnePerCall(interrogator_component(CLIP_IMAGE), ClipImage(clip).eval(),
                   (TensorSpec("image", "float32", (SINGLE, 3, side, side)),),
                   (TensorSpec("features", "float32", (SINGLE, dim)),), lambda dims: (torch.randn(1, 3, side, side),), {}),
        Descriptor(interrogator_component(CLIP_TEXT), ClipText(clip, table).eval(),
                   (TensorSpec("rows", "int64", (CLIP_TEXTS,)),), (TensorSpec("features", "float32", (CLIP_TEXTS, dim)),),
                   lambda dims: (torch.randint(0, rows, (dims.get(CLIP_TEXTS, 3),)),), {CLIP_TEXTS: 3}),
    ]


def register_clip_interrogator(folder: Path, blip_path: Path, blip_state: dict, clip_path: Path,
                               clip_state: dict) -> tuple[list[Descriptor], dict]:
    """The CLIP interrogator's networks and its spec entry (the files' hashes: its networks' to re-export when one
    changes; the categories' hash is the text network's with CLIP's)."""
    blip = blip_model(blip_state, blip_path)
    clip = openai_clip()[0].build_model(clip_state).float().eval()  # as clip.load on a CPU: fp32
    categories = read_categories(folder)
    lines = [line for category in categories for line in category["lines"]]
    blip_sha, clip_sha = file_sha256(blip_path, progress=False), file_sha256(clip_path, progress=False)
    texts = hashlib.sha256("\n".join([clip_sha, *lines]).encode()).hexdigest()
    entry = {"file": blip_path.name, "sha256": blip_sha, "clip_file": clip_path.name,
             "blip_size": blip.config.vision_config.image_size, "clip_size": clip.visual.input_resolution,
             "categories": categories, **blip_words(folder, blip.config.text_config.vocab_size),
             "networks": {interrogator_component(BLIP_VISION): blip_sha, interrogator_component(BLIP_DECODER): blip_sha,
                          interrogator_component(CLIP_IMAGE): clip_sha, interrogator_component(CLIP_TEXT): texts},
             "caption_tokens": min(CAPTION_LENGTH[1], blip.config.text_config.max_position_embeddings)}
    return clip_descriptors(blip, clip, clip_tokens(lines, clip.context_length)), entry
