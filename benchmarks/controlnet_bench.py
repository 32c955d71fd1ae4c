"""What ControlNet costs, side by side in one run: the same model exported without ControlNets and with one, and
requests with no unit, one unit and two.

    python benchmarks/controlnet_bench.py [--model tiny|half] [--size 256] [--steps 10] [--repeats 3]

With ControlNets the U-Net takes their residuals as inputs, zeros when no unit is active: the first ratio (no unit,
export with ControlNets, over the export without) is what that costs a request that uses none (the target: no
measurable difference, within the runs' spread). The others are a unit's cost (each unit runs its ControlNet, about
the U-Net's encoder half, every step). In-process (onnxruntime) and served (tritonserver over gRPC, one request at a
time). Writes the "controlnet-<model>" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, default_export, model_parser, median, table, timed, write_section  # noqa: E402


def controlnet_folder(model: Path, out: Path) -> Path:
    """One ControlNet of the model's U-Net (random weights: the cost does not depend on them), in diffusers' layout."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(model / "unet"), local_files_only=True)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(str(out / "control_bench"))
    return out


def main() -> None:
    parser = model_parser(__doc__, size=256)
    parser.set_defaults(steps=10)
    args = parser.parse_args()

    import numpy as np

    from sdtrt.client import Client
    from sdtrt.export import export_model
    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.pipeline.local import LocalPipeline
    from sdtrt.requests.controlnet import ControlUnit, units_json
    from sdtrt.requests.request import Txt2ImgRequest

    work, model, plain_repo = default_export("sdtrt-controlnet-bench-", args.model)
    controlled_repo = work / "repo-controlnet"
    export_model(model, controlled_repo, progress=False, report=lambda *_: None,
                 controlnet_dir=controlnet_folder(model, work / "ControlNet"))
    size, steps = args.size, args.steps
    settings = dict(prompt="a lighthouse on a cliff", sampler="Euler a", steps=steps, guidance_scale=7.0, seed=42,
                    width=size, height=size)
    picture = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    one, two = ([ControlUnit(model="control_bench")] * n for n in (1, 2))
    cases = [("export without ControlNets, no unit", plain_repo, []), ("export with one, no unit", controlled_repo, []),
             ("one unit", controlled_repo, one), ("two units", controlled_repo, two)]
    rows, times = [], {}
    local = {repo: LocalPipeline(repo) for repo in (plain_repo, controlled_repo)}
    for name, repo, units in cases:
        request = Txt2ImgRequest(**settings, controlnet_units=units_json(units) if units else "")
        times[name, "in-process"] = timed(lambda: local[repo].txt2img(request, control_images=[picture] * len(units)),
                                          args.repeats)
    for repo in (plain_repo, controlled_repo):
        with TritonServer(repo, http_port=18500, grpc_port=18501, metrics_port=18502, log_file=work / "triton.log") \
                as server, Client(server.url) as client:
            for name, where, units in cases:
                if where != repo:
                    continue
                unit_dicts = [{"model": "control_bench", "image": picture}] * len(units)
                times[name, "served"] = timed(lambda: client.txt2img(**settings, controlnet=unit_dicts or None),
                                              args.repeats)
    base = {how: median(times[cases[0][0], how]) for how in ("in-process", "served")}
    for name, _, _ in cases:
        rows.append([name] + [f"{median(times[name, how]):.3f} s ({median(times[name, how]) / base[how]:.2f}x)"
                              for how in ("in-process", "served")])
    body = (f"`python benchmarks/controlnet_bench.py --model {args.model} --size {size} --steps {steps} --repeats "
            f"{args.repeats}`: {size}x{size}, {steps} steps, Euler a, CFG 7, medians of {args.repeats}, on "
            f"{cpu_name()} (onnxruntime fp32). The ratios are over the export without ControlNets.\n\n"
            + table(["request", "in-process", "served (gRPC)"], rows))
    write_section(f"controlnet-{args.model}", body)
    print(body)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
