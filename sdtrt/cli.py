"""The ``sdtrt`` command line: build the default model, export, generate (and, later, serve)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from sdtrt import __version__
from sdtrt.errors import SdtrtError
from sdtrt.request import Txt2ImgRequest, request_fields
from sdtrt.samplers import SAMPLERS

# The request table of a typical SD 1.x export, used only to document the flags; a served or exported
# model's own spec decides the real defaults and limits (e.g. its native size).
_DOC_FIELDS = request_fields(native_size=512, min_size=64, max_size=1024, size_multiple=8, max_batch=4)

# CLI flag -> request field; flag names follow AUTOMATIC1111 where it has one (--cfg-scale).
TXT2IMG_FLAGS = {
    "--negative-prompt": "negative_prompt",
    "--steps": "steps",
    "--sampler": "sampler",
    "--cfg-scale": "guidance_scale",
    "--seed": "seed",
    "--width": "width",
    "--height": "height",
    "--batch-size": "batch_size",
}

EPILOG_MAIN = """\
typical session:
  sdtrt init-default --out models/default        # build the small offline demo model
  sdtrt export models/default --out repos/default  # ONNX + spec (+ Triton model repository)
  sdtrt txt2img "a lighthouse at dawn" --local repos/default --seed 42 --out outputs/
"""


def _field_help(name: str) -> str:
    f = _DOC_FIELDS[name]
    default = "the model's native size" if name in ("width", "height") else repr(f.default)
    return f"{f.help}; {f.allowed()} (default: {default})"


def _type_for(name: str):
    dtype = _DOC_FIELDS[name].dtype
    return int if dtype.startswith("int") else float if dtype.startswith("float") else str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdtrt",
        description="Stable Diffusion through ONNX/TensorRT and Triton Inference Server.",
        epilog=EPILOG_MAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdtrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init-default", help="build the small offline default model (a diffusers folder)",
                       description="Build the embedded default model: a tiny Stable-Diffusion-shaped pipeline with "
                       "CLIP's real tokenizer, random weights from a fixed seed, byte-identical on every build.")
    p.add_argument("--out", type=Path, default=Path("models/default"), help="output folder (default: models/default)")
    p.add_argument("--clip-bpe", type=Path, default=None,
                   help="CLIP's bpe_simple_vocab_16e6.txt.gz, or the open-clip-torch wheel holding it "
                   "(default: the cache, else fetched from PyPI)")
    p.set_defaults(func=cmd_init_default)

    p = sub.add_parser("export", help="export a checkpoint to ONNX and write the model spec",
                       description="Export the text encoder, U-Net and VAE decoder of a Stable Diffusion checkpoint to "
                       "ONNX (opset 17, dynamic batch, latent height/width and text length), check each with "
                       "onnx.checker and against torch in onnxruntime, and write sdtrt_spec.json.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", help="diffusers folder, or single-file .safetensors (with --config)")
    p.add_argument("--out", type=Path, required=True, metavar="REPO_DIR", help="output model repository")
    p.add_argument("--config", type=Path, default=None,
                   help="for a single-file checkpoint: a local diffusers folder of the same architecture")
    p.add_argument("--max-batch", type=int, default=4, help="most images per request")
    p.add_argument("--min-size", type=int, default=64, help="smallest width/height in pixels")
    p.add_argument("--max-size", type=int, default=1024, help="largest width/height in pixels")
    p.add_argument("--max-chunks", type=int, default=3, help="longest prompt, in 75-token chunks")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("txt2img", help="generate images from a prompt",
                       description="Generate images from a prompt and save them as PNGs with AUTOMATIC1111 "
                       "infotext. With --local the exported ONNX runs in this process (the reference runner).")
    p.add_argument("prompt", help="what to draw")
    for flag, name in TXT2IMG_FLAGS.items():
        kwargs = {"choices": list(SAMPLERS), "metavar": "NAME"} if name == "sampler" else {}
        p.add_argument(flag, dest=name, type=_type_for(name), default=None, help=_field_help(name), **kwargs)
    p.add_argument("--local", type=Path, metavar="REPO_DIR", required=True,
                   help="run the exported repository in-process with onnxruntime")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNGs (default: outputs/)")
    p.set_defaults(func=cmd_txt2img)

    p = sub.add_parser("samplers", help="list the sampler names and the diffusers scheduler behind each")
    p.set_defaults(func=cmd_samplers)
    return parser


def cmd_init_default(args: argparse.Namespace) -> int:
    from sdtrt.default_model import build_default_model

    path = build_default_model(args.out, args.clip_bpe)
    print(f"default model written to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sdtrt.export import export_model

    spec = export_model(args.model, args.out, config=args.config, max_batch=args.max_batch,
                        min_size=args.min_size, max_size=args.max_size, max_chunks=args.max_chunks)
    print(f"exported {spec.model_name} [{spec.model_hash}] to {args.out}")
    return 0


def cmd_txt2img(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from sdtrt.local import LocalPipeline
    from sdtrt.outputs import save_png
    from sdtrt.request import validate
    from sdtrt.spec import load_spec

    settings = {name: getattr(args, name) for name in TXT2IMG_FLAGS.values() if getattr(args, name) is not None}
    request = validate(Txt2ImgRequest(prompt=args.prompt, **settings), load_spec(args.local))  # fail before any work
    pipeline = LocalPipeline(args.local)
    with tqdm(total=request.steps, desc="sampling", unit="step") as bar:
        def on_step(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = pipeline.txt2img(request, on_step=on_step)
    for image, seed, info in zip(result.images, result.seeds, result.infotexts):
        print(save_png(image, seed, info, args.out))
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    width = max(len(n) for n in SAMPLERS)
    for s in SAMPLERS.values():
        extra = " ".join(f"{k}={v}" for k, v in s.overrides.items())
        print(f"{s.name:<{width}}  {s.scheduler} {extra}".rstrip())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sdtrt never downloads weights
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SdtrtError as exc:
        print(f"sdtrt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
