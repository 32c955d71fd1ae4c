"""Step-level batching: what concurrent requests gain, side by side in one run (the embedded default model).

    python benchmarks/batching_bench.py [--steps 20] [--size 256] [--repeats 3] [--clients 4] [--delays 0,2000]

For each U-Net queue delay (Triton's ``max_queue_delay_microseconds``, which only matters for calls the job's own
step batcher did not merge), one server on the same repository: one request alone and a burst of ``--clients``
concurrent requests, in turns; how many loops' steps each U-Net call carried (sdtrt's own metrics); and the
U-Net's own cost for one request's rows vs all of theirs, which bounds what merging can give on this machine.
Writes the "batching" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import cpu_name, default_export, median, table, timed, write_section  # noqa: E402

DELAYS_US = (0, 2000)


def merged(metrics_url: str) -> tuple[float, float]:
    """(U-Net calls the txt2img job sent, loops' steps they carried) so far, from sdtrt_step_batch_loops."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()

    def sample(name: str) -> float:
        match = re.search(rf'^{name}\{{job="txt2img"\}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    return sample("sdtrt_step_batch_loops_count"), sample("sdtrt_step_batch_loops_sum")


def unet_ceiling(local, clients: int, size: int, repeats: int) -> tuple[float, float]:
    """The U-Net alone, in-process: seconds for one request's rows (2: CFG) and for ``clients`` requests' rows in
    one call. Their ratio bounds what merging steps can give on this machine."""
    import numpy as np

    from sdtrt.contract.spec import CONTEXT, LATENT_H, LATENT_W

    spec = local.spec
    unet = spec.component("unet")
    latent = size // spec.vae_scale_factor
    dims = {LATENT_H: latent, LATENT_W: latent, CONTEXT: spec.text_max_length}

    def arrays(rows: int) -> list[np.ndarray]:
        return [np.ones([rows if i == 0 else dims.get(d, d) if isinstance(d, str) else d
                         for i, d in enumerate(t.shape)], dtype=t.dtype) for t in unet.inputs]

    one, many = arrays(2), arrays(2 * clients)
    return (median(timed(lambda: local.run("unet", *one), 3 * repeats)),
            median(timed(lambda: local.run("unet", *many), 3 * repeats)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--delays", type=lambda v: [int(d) for d in v.split(",")], default=list(DELAYS_US),
                        metavar="US,US", help="U-Net queue delays to compare (microseconds)")
    args = parser.parse_args()

    from sdtrt.model_repository.serving.server import TritonServer
    from sdtrt.client import Client
    from sdtrt.pipeline.local import LocalPipeline
    from sdtrt.model_repository.build import write_repository
    from sdtrt.model_repository.configs import ServingOptions
    from sdtrt.contract.spec import load_catalog

    work, _, repo = default_export("sdtrt-batching-")
    prompt = "a lighthouse on a cliff at dawn, oil painting"
    settings = dict(sampler="Euler a", steps=args.steps, guidance_scale=7.0, seed=42, width=args.size,
                    height=args.size)
    local = LocalPipeline(repo)
    unet_one, unet_many = unet_ceiling(local, args.clients, args.size, args.repeats)

    rows = []
    for delay in args.delays:
        write_repository(repo, load_catalog(repo), replace(ServingOptions(), unet_queue_delay_us=delay))
        with TritonServer(repo, http_port=18200, grpc_port=18201, metrics_port=18202,
                          log_file=work / f"triton-{delay}.log"):
            client = Client("127.0.0.1:18201")

            def burst():
                threads = [threading.Thread(target=lambda s=s: client.txt2img(prompt, **{**settings, "seed": s}))
                           for s in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

            single = lambda: client.txt2img(prompt, **settings)  # noqa: E731
            single(), burst()  # warm every loop
            # In rounds (one request alone, then a burst): drift on a shared machine slows both alike.
            singles, bursts = [], []
            calls0, loops0 = merged("http://127.0.0.1:18202/metrics")
            for _ in range(args.repeats):
                singles += timed(single, 1, warmup=0)
                bursts += timed(burst, 1, warmup=0)
            calls1, loops1 = merged("http://127.0.0.1:18202/metrics")
            lone = args.repeats * args.steps  # the lone requests' calls, one loop each: not what is measured
            calls0, loops0 = calls0 + lone, loops0 + lone
            one, elapsed = median(singles), median(bursts)
        throughput = args.clients / elapsed
        rows.append([f"{delay} us", f"{one:.3f}", f"{throughput:.2f}",
                     f"{throughput * one:.2f}x", f"{(loops1 - loops0) / max(calls1 - calls0, 1):.2f}"])

    body = f"""## Step-level batching: what concurrent requests gain (embedded default model, served)

Machine: {cpu_name()}, {os.cpu_count()} cores, no GPU. One run of `python benchmarks/batching_bench.py --steps
{args.steps} --size {args.size} --repeats {args.repeats} --clients {args.clients}`: {args.size}x{args.size},
{args.steps} steps, Euler a, CFG 7; one server per delay on the same repository, one request alone and a burst
of {args.clients} in turns, medians of {args.repeats}. (Served vs in-process latency: benchmarks/overhead_trace.py.)

{table(["U-Net queue delay", "1 client: s per image", f"{args.clients} clients: images/s",
        f"{args.clients} clients vs 1", "loops per U-Net call"], rows)}

"loops per U-Net call" is the mean number of requests whose steps one U-Net call carried while {args.clients}
clients ran (sdtrt_step_batch_loops: the job's loops step together, model_repository/models/step_batcher.py).

The ceiling on this machine: the U-Net alone (in-process) takes {1000 * unet_one:.1f} ms for one request's 2 rows
and {1000 * unet_many:.1f} ms for {args.clients} requests' {2 * args.clients} rows in one call, so merging saves at
most {100 * (1 - unet_many / (args.clients * unet_one)):.0f}% of the U-Net's time ({args.clients * unet_one / unet_many:.2f}x);
the rest of a gain has to come from overlapping the loops' own work with the networks'. A CPU's cost grows with
the rows almost linearly; a GPU's does not, which is where step-level batching pays.
"""
    write_section("batching", body)
    print(body)


if __name__ == "__main__":
    main()
