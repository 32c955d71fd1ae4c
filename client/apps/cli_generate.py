"""The generation commands of the ``sdtrt`` CLI: txt2img, img2img, png-info.

Every request field becomes a flag, documented from the field table (its range and default); flag names follow
AUTOMATIC1111 where A1111 names it differently (--cfg-scale). They talk to a running server through
:class:`sdtrt.client.Client`, or run the export in-process with ``--local``. As in cli.py, each command imports
the layers it runs when it runs: a client-only install has no in-process runner, and the page and the gateway
load nothing until they are asked for.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrt.contract.errors import UsageError
from sdtrt.contract.outputs import read_infotext, save_png
from sdtrt.contract.spec import DEFAULT_PORTS, load_spec
from sdtrt.requests.fields import BY_NAME
from sdtrt.requests.generation import batch_count, concatenate, settings_from_infotext
from sdtrt.requests.plan import validate
from sdtrt.requests.request import Img2ImgRequest, Txt2ImgRequest, job_fields, resolve_seeds
from sdtrt.requests.styles import DEFAULT_STYLES_FILE

DEFAULT_MAX_GENERATIONS = 32  # the gateway's generation threads (client/apps/a1111_api.py)

if TYPE_CHECKING:
    from sdtrt.contract.spec import ModelSpec

def flag(name: str) -> str:
    return BY_NAME[name].cli_flag


def _help(name: str, spec: "ModelSpec | None") -> str:
    if spec is None:
        return BY_NAME[name].help.replace("%", "%%")
    f = spec.field(name)
    return f"{f.help}; {f.allowed()} (default: {f.default!r})".replace("%", "%%")


def add_field_flags(parser: argparse.ArgumentParser, request_type: type, spec: "ModelSpec | None" = None) -> None:
    title = (f"generation settings: the ranges and defaults of {spec.title}" if spec else
             "generation settings (ranges and defaults are the model's: add --url URL or --local DIR to --help)")
    group = parser.add_argument_group(title)
    for name in job_fields(request_type):
        if name == "prompt":
            continue
        f = BY_NAME[name]  # its type and choices; its defaults and limits are the model's (_help)
        if f.dtype == "bool":
            group.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=_help(name, spec))  # (--no-NAME: a field that defaults to true)
            continue
        kind = int if f.dtype.startswith("int") else float if f.dtype.startswith("float") else str
        choices = spec.field(name).choices if spec is not None else None if callable(f.choices) else f.choices
        extra = {"choices": list(choices), "metavar": "NAME"} if choices else {}
        group.add_argument(flag(name), dest=name, type=kind, default=None, help=_help(name, spec), **extra)


def spec_for_help(argv: list[str]) -> "ModelSpec | None":
    """For `sdtrt txt2img --url URL --help` (or --local REPO_DIR): the model's spec, so that the flags show its
    own ranges and defaults; None when no model was named or it cannot be reached."""
    if not ({"-h", "--help"} & set(argv)) or not ({"txt2img", "img2img"} & set(argv)):
        return None
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--url")
    peek.add_argument("--protocol", default="grpc")
    peek.add_argument("--local", type=Path)
    peek.add_argument("--model")
    known, _ = peek.parse_known_args(argv)
    try:
        if known.local is not None:
            return load_spec(known.local, known.model)
        if known.url is not None:
            # loaded when the command runs (see the module docstring)
            from sdtrt.client import Client

            return Client(known.url, known.protocol, timeout=10).catalog.get(known.model)
    except Exception as exc:  # help must still print
        print(f"(could not read the model's spec: {exc})", file=sys.stderr)
    return None


def add_target_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-iter", type=int, default=1, metavar="N",
                        help="batch count: N batches one after another, seeds continuing (default: 1)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help="a running `sdtrt serve` (default: localhost:8001 for grpc, localhost:8000 for http)")
    where.add_argument("--local", type=Path, metavar="REPO_DIR",
                       help="instead of a server, run the exported repository in this process with onnxruntime")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="how to talk to --url (default: grpc)")
    parser.add_argument("--model", default=None,
                        help="which of the server's (or repository's) models: `sdtrt models` lists them "
                        "(default: its default model)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNGs (default: outputs/)")


def add_commands(sub, spec: "ModelSpec | None" = None) -> None:
    p = sub.add_parser("txt2img", help="generate images from a prompt",
                       description="Generate images from a prompt and save them as PNGs with AUTOMATIC1111 infotext "
                       "(00001-<seed>.png, never overwriting). Prompt syntax is A1111's: (word), (word:1.3), [word], "
                       "BREAK; prompts longer than 75 tokens are split into chunks.")
    p.add_argument("prompt", nargs="?", default=None, help="what to draw (may come from --from-png instead)")
    p.add_argument("--from-png", type=Path, metavar="FILE",
                   help="take every setting from a PNG's A1111 infotext (flags given here override them)")
    add_field_flags(p, Txt2ImgRequest, spec)
    p.add_argument("--firstpass-image", type=Path, default=None, metavar="FILE",
                   help="with --enable-hr: start the hires fix from this picture (the first pass's size) instead of "
                   "drawing the first pass (A1111's firstpass_image)")
    _controlnet_flag(p)
    add_target_flags(p)
    p.set_defaults(func=cmd_txt2img)

    p = sub.add_parser("img2img", help="redraw a picture from a prompt; with --mask, inpaint",
                       description="Redraw --init-image guided by a prompt (denoising strength: how much changes). "
                       "With --mask (white = repaint) only the masked area is redrawn and the rest is kept.")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--init-image", type=Path, required=True, metavar="FILE", help="the picture to start from")
    p.add_argument("--mask", type=Path, default=None, metavar="FILE", help="inpainting mask: white = repaint")
    p.add_argument("--latent-mask", type=Path, default=None, metavar="FILE",
                   help="inpainting: another mask for the latents' blending, taken as it is (A1111's latent_mask)")
    add_field_flags(p, Img2ImgRequest, spec)
    _controlnet_flag(p)
    add_target_flags(p)
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser("ui", help="the Gradio web page over a running server (default port 7860)",
                       description="Serve a Gradio page (prompt, sampler, steps, CFG, seed, size, batch; gallery with "
                       "the infotext) that talks to a running `sdtrt serve`. PNGs are also saved under "
                       "OUT/txt2img-images/.")
    _server_flags(p, port=7860)
    _auth_flags(p, "gradio-auth", "SDTRT_GRADIO_AUTH", "the page asks for a login")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("api", help="an AUTOMATIC1111-compatible REST API (/sdapi/v1) over a running server",
                       description="Serve A1111's /sdapi/v1 endpoints (txt2img, img2img, png-info, samplers, "
                       "schedulers, sd-models, sd-vae, options, progress, upscalers) in front of a running `sdtrt "
                       "serve`; the OpenAPI schema is at /openapi.json and the docs at /docs. Unknown keys are "
                       "ignored and listed; fields sdtrt cannot honour are refused with 422 naming them when they "
                       "would change the picture.")
    _server_flags(p, port=7861)
    p.add_argument("--metrics-url", default=None, metavar="URL",
                   help="the server's Prometheus metrics, for /sdapi/v1/memory (default: --url's host, port 8002)")
    _auth_flags(p, "api-auth", "SDTRT_API_AUTH", "every endpoint wants HTTP basic auth")
    p.add_argument("--max-generations", type=int, default=DEFAULT_MAX_GENERATIONS, metavar="N",
                   help="generation requests the gateway works on at once (more wait their turn); progress, "
                   "interrupt, skip, options and /healthz have threads of their own (default: %(default)s)")
    p.add_argument("--max-request-mb", type=float, default=64.0, metavar="MB",
                   help="largest request body; bigger ones get 413 before they are read (default: %(default)s)")
    p.add_argument("--options-file", type=Path, default=None, metavar="JSON",
                   help="each user's A1111 options, kept across restarts as A1111 keeps its config.json (default: "
                   "sdtrt-a1111-options.json in --out, the gateway's writable folder)")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("png-info", help="print the AUTOMATIC1111 infotext a PNG carries",
                       description="Print the `parameters` text chunk of a PNG written by sdtrt or A1111.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the settings sdtrt reads from it, as JSON")
    p.set_defaults(func=cmd_png_info)


def _server_flags(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--url", default=None, help="the `sdtrt serve` to use (default: localhost:8001 grpc)")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="how to talk to --url")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=port, help=f"port to listen on (default: {port})")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="where saved PNGs go (default: outputs/)")
    parser.add_argument("--wait-for-server", type=float, default=0.0, metavar="SECONDS",
                        help="keep trying to reach the server this long before giving up (default: fail at once); "
                        "for deployments where this starts before the server is ready")
    parser.add_argument("--styles-file", type=Path, default=DEFAULT_STYLES_FILE, metavar="CSV",
                        help="A1111's prompt styles file (name,prompt,negative_prompt; default: ./styles.csv)")


def _auth_flags(parser: argparse.ArgumentParser, name: str, env: str, what: str) -> None:
    parser.add_argument(f"--{name}", default=None, metavar="USER:PASS[,USER:PASS]",
                        help=f"credentials, as A1111's --{name}: {what} (also ${env})")
    parser.add_argument(f"--{name}-path", type=Path, default=None, metavar="FILE",
                        help="credentials from a file: USER:PASS entries, one per line or comma-separated")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="listen on a non-loopback --host without credentials (refused otherwise): only behind "
                        "something else that authenticates, e.g. an authenticating proxy")
    parser.set_defaults(auth_flag=name, auth_env=env)


def credentials(args: argparse.Namespace) -> dict[str, str]:
    """user -> password from the flag, the file and the environment variable (all of them, merged)."""
    dest = args.auth_flag.replace("-", "_")
    texts = [getattr(args, dest) or "", os.environ.get(args.auth_env, "")]
    path = getattr(args, dest + "_path")
    if path is not None:
        if not path.is_file():
            raise UsageError(f"--{args.auth_flag}-path {path}: no such file")
        texts.append(path.read_text())
    users: dict[str, str] = {}
    for entry in (e.strip() for text in texts for line in text.splitlines() for e in line.split(",")):
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            # never echo the entry: it may be a password
            raise UsageError(f"--{args.auth_flag}: each entry must be USER:PASS (an entry without ':' or with an "
                             "empty user or password was given)")
        users[user] = password
    return users


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _refuse_if_open(args: argparse.Namespace, users: dict[str, str], what: str) -> None:
    """Beyond loopback, credentials or the operator's explicit word: anyone who reaches an open page or API uses
    the GPUs behind it and sees what others generate."""
    if users or is_loopback(args.host):
        return
    if not args.allow_unauthenticated:
        raise UsageError(f"{what} would listen on {args.host} without credentials, so anyone who can reach it could "
                         f"use it: give --{args.auth_flag} USER:PASS (or --{args.auth_flag}-path FILE, or "
                         f"${args.auth_env}), or say --allow-unauthenticated if something in front of it "
                         "authenticates")
    print(f"warning: {what} listens on {args.host} without credentials (--allow-unauthenticated)",
          file=sys.stderr, flush=True)


def _connected_client(args: argparse.Namespace):
    # loaded when the command runs (see the module docstring)
    from sdtrt.client import Client, ServerError

    client = Client(args.url, protocol=args.protocol)
    deadline = time.monotonic() + getattr(args, "wait_for_server", 0.0)
    said = 0.0
    while True:
        try:
            client.spec  # fail now, with the server's address, if it is not there
            return client
        except ServerError:
            if time.monotonic() >= deadline:
                raise
            if time.monotonic() - said > 30:
                print(f"waiting for the sdtrt server at {client.url} ({client.protocol})", file=sys.stderr, flush=True)
                said = time.monotonic()
            time.sleep(2)


def cmd_ui(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    from sdtrt.client.apps.ui import serve_ui

    users = credentials(args)
    _refuse_if_open(args, users, "the page")
    client = _connected_client(args)
    print(f"sdtrt ui on http://{args.host}:{args.port} (server {client.url}; "
          f"{'login required' if users else 'no login'})", flush=True)
    serve_ui(client, args.host, args.port, args.out, users or None, args.styles_file)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    # loaded when the command runs (see the module docstring)
    import uvicorn

    from sdtrt.client.apps.a1111_api import GatewayLimits, create_app

    users = credentials(args)
    _refuse_if_open(args, users, "the A1111 API")
    client = _connected_client(args)
    print(f"A1111 API on http://{args.host}:{args.port}/sdapi/v1 (docs: /docs; server {client.url}; "
          f"{'HTTP basic auth' if users else 'no auth'})", flush=True)
    metrics_url = args.metrics_url or f"http://{client.url.rsplit(':', 1)[0]}:{DEFAULT_PORTS['metrics']}/metrics"
    flags = {"api": True, "nowebui": True, "listen": not is_loopback(args.host), "port": args.port,
             "api_auth": "(set)" if users else None}
    options_file = args.options_file or args.out / "sdtrt-a1111-options.json"
    app = create_app(client, args.out, users or None, styles_file=args.styles_file, metrics_url=metrics_url,
                     flags=flags, limits=GatewayLimits(int(args.max_request_mb * 2**20), args.max_generations),
                     options_file=options_file)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _controlnet_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controlnet", action="append", default=[], metavar="NAME:IMAGE[:WEIGHT][,KEY=VALUE...]",
                   help="a ControlNet unit (repeatable, at most 3): the model's ControlNet NAME (its file stem, as "
                   "`sdtrt models` lists them) steered by the control picture IMAGE at WEIGHT (default 1); more of "
                   "sd-webui-controlnet's unit settings after commas, e.g. ,module=canny,guidance_end=0.6,"
                   "control_mode=ControlNet is more important")


def controlnet_units(texts: list[str]) -> list[dict[str, Any]]:
    """The units of the --controlnet flags, each with its picture loaded (``image``)."""
    units = []
    for text in texts:
        head, *pairs = text.split(",")
        name, _, rest = head.partition(":")
        path, weight = rest, None
        if ":" in rest:
            before, _, last = rest.rpartition(":")
            try:
                path, weight = before, float(last)
            except ValueError:
                pass
        if not name or not path:
            raise UsageError(f"--controlnet {text!r}: give NAME:IMAGE[:WEIGHT], e.g. control_v11p_sd15_canny:edges.png")
        unit: dict[str, Any] = {"model": name, "image": _picture(Path(path), "RGB")}
        if weight is not None:
            unit["weight"] = weight
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise UsageError(f"--controlnet {text!r}: {pair!r} is not KEY=VALUE")
            unit[key.strip()] = _setting_value(value.strip())
        units.append(unit)
    return units


def _setting_value(value: str) -> Any:
    """A unit setting from the command line: true/false, a number, or the text as it is."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _settings(args: argparse.Namespace, request_type: type) -> dict[str, Any]:
    settings = {name: getattr(args, name) for name in job_fields(request_type)
                if name != "prompt" and getattr(args, name, None) is not None}
    if getattr(args, "controlnet", None):
        if "controlnet_units" in settings:
            raise UsageError("--controlnet and --controlnet-units: give the units one way")
        settings["controlnet"] = controlnet_units(args.controlnet)
    return settings


def _infotext(path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    text = read_infotext(path)
    if not text:
        raise UsageError(f"{path} has no `parameters` text chunk (not written by sdtrt or AUTOMATIC1111)")
    return text


def _save(result, out: Path) -> int:
    for image, seed, info in zip(result.images, result.seeds, result.infotexts):
        print(save_png(image, seed, info, out))
    return 0


def cmd_txt2img(args: argparse.Namespace) -> int:
    settings = _settings(args, Txt2ImgRequest)
    prompt = args.prompt
    if args.from_png:
        stored = settings_from_infotext(_infotext(args.from_png))
        model, model_hash = stored.pop("Model", None), stored.pop("Model hash", None)
        prompt = prompt if prompt is not None else stored.pop("prompt")
        stored.pop("prompt", None)
        settings = {**stored, **settings}
        if model_hash:
            print(f"settings from {args.from_png} (made with {model} [{model_hash}])", file=sys.stderr)
    if prompt is None:
        raise UsageError("give a prompt, or --from-png FILE")
    return _save(_run(args, "txt2img", prompt, settings, (_picture(args.firstpass_image, "RGB"),)), args.out)


def _picture(path: Path | None, mode: str):
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    # loaded when the command runs (see the module docstring)
    from PIL import Image

    with Image.open(path) as im:
        return im.convert(mode)


def cmd_img2img(args: argparse.Namespace) -> int:
    images = (_picture(args.init_image, "RGB"), _picture(args.mask, "L"), _picture(args.latent_mask, "L"))
    return _save(_run(args, "img2img", args.prompt, _settings(args, Img2ImgRequest), images), args.out)


def _run(args: argparse.Namespace, job: str, prompt: str, settings: dict[str, Any], images=None):
    if args.local:
        return _run_local(args, job, prompt, settings, images)
    # loaded when the command runs (see the module docstring)
    from sdtrt.client import Client

    with Client(args.url, protocol=args.protocol) as client:
        if job == "txt2img":
            return client.txt2img(prompt, n_iter=args.n_iter, model=args.model, firstpass_image=images[0],
                                  **settings)
        init, mask, latent_mask = images
        return client.img2img(prompt, init, mask, n_iter=args.n_iter, model=args.model, latent_mask=latent_mask,
                              **settings)


def _run_local(args: argparse.Namespace, job: str, prompt: str, settings: dict[str, Any], images):
    # loaded when the command runs (see the module docstring)
    import numpy as np
    from tqdm.auto import tqdm

    from sdtrt.pipeline.local import LocalPipeline

    request_type = Txt2ImgRequest if job == "txt2img" else Img2ImgRequest
    units = settings.pop("controlnet", None) or []
    controls = [None if u.get("image") is None else np.asarray(u["image"]) for u in units]
    if units:
        settings["controlnet_units"] = json.dumps([{k: v for k, v in u.items() if k not in ("image", "mask")}
                                                   for u in units])
    request = validate(request_type(prompt=prompt, **settings), load_spec(args.local, args.model))  # fail first
    batches = batch_count(resolve_seeds(request), args.n_iter)
    pipeline = LocalPipeline(args.local, model=args.model)
    with tqdm(desc="sampling", unit="step") as bar:
        def on_step(done: int, total: int, latents) -> None:
            bar.update(1)

        if job == "txt2img":
            first = None if images[0] is None else np.asarray(images[0])
            return concatenate([pipeline.txt2img(r, on_step=on_step, firstpass_image=first, control_images=controls)
                                for r in batches])
        init, mask, latent_mask = [None if im is None else np.asarray(im) for im in images]
        return concatenate([pipeline.img2img(r, init, mask, on_step=on_step, latent_mask=latent_mask,
                                             control_images=controls) for r in batches])


def cmd_png_info(args: argparse.Namespace) -> int:
    text = _infotext(args.file)
    print(json.dumps(settings_from_infotext(text), indent=2) if args.json else text)
    return 0
