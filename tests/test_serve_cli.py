"""`sdtrt serve`, `sdtrt txt2img --url` and perf_analyzer, as a user runs them, against real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import numpy as np
import psutil
import pytest
from PIL import Image

from servers import free_ports
from sdtrt.client import Client
from sdtrt.infotext import parse_infotext


def sdtrt(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdtrt", *args], capture_output=True, text=True, **kwargs)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_serve_starts_serves_and_stops_cleanly_on_sigterm(exported_repo, tmp_path):
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtrt", "serve", "-m", str(exported_repo), "--http-port", str(http), "--grpc-port",
         str(grpc), "--metrics-port", str(metrics), "--log-file", str(log), "--", "--log-verbose=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # wait for the ready line
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert any(line.startswith("ready:") for line in lines), "".join(lines)
        result = sdtrt("txt2img", "a cat", "--url", f"127.0.0.1:{http}", "--protocol", "http", "--steps", "3",
                       "--width", "64", "--height", "64", "--seed", "9", "--out", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out" / "00001-9.png").is_file()
        triton = next(p for p in psutil.Process(proc.pid).children() if p.name() == "tritonserver")
        server_group = os.getpgid(triton.pid)
        assert "--log-verbose=1" in triton.cmdline()  # arguments after `--` reach tritonserver
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        assert proc.wait(60) == 0, rest
        assert "tritonserver stopped (exit code 0)" in rest
        deadline = time.monotonic() + 10
        while group_alive(server_group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(server_group), "a tritonserver or Python stub outlived `sdtrt serve`"
        assert "successfully unloaded" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_a_folder_that_is_not_an_export(tmp_path):
    result = sdtrt("serve", "-m", str(tmp_path))
    assert result.returncode == 2
    assert "not an sdtrt export" in result.stderr and "sdtrt export" in result.stderr


def test_cli_txt2img_through_the_server(server, tmp_path):
    result = sdtrt("txt2img", "a lighthouse, oil painting", "--negative-prompt", "blurry, low quality", "--steps", "4",
                   "--sampler", "Euler", "--cfg-scale", "7", "--seed", "42", "--width", "64", "--height", "64",
                   "--batch-size", "2", "--url", server.url, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001-42.png", "00002-43.png"]
    with Image.open(tmp_path / "00001-42.png") as im:
        prompt, negative, params = parse_infotext(im.info["parameters"])
        pixels = np.array(im)
    assert (prompt, negative) == ("a lighthouse, oil painting", "blurry, low quality")
    assert params["Seed"] == "42" and params["Sampler"] == "Euler" and params["Size"] == "64x64"
    direct = Client(server.url).txt2img("a lighthouse, oil painting", negative_prompt="blurry, low quality", steps=4,
                                        sampler="Euler", guidance_scale=7, seed=42, width=64, height=64)
    assert (direct.images[0] == pixels).all()


def test_cli_reports_server_errors_without_traceback(server, tmp_path):
    result = sdtrt("txt2img", "x", "--url", "127.0.0.1:1", "--out", str(tmp_path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "sdtrt serve" in result.stderr


def test_client_killed_mid_request_leaves_the_server_serving(server, tmp_path):
    script = (
        "from sdtrt.client import Client\n"
        f"Client({server.url!r}).txt2img('a long one', steps=150, width=256, height=256, batch_size=4)\n"
    )
    victim = subprocess.Popen([sys.executable, "-c", script])
    time.sleep(3)
    victim.kill()
    victim.wait()
    result = Client(server.url).txt2img("still here", steps=3, width=64, height=64, seed=1)
    assert result.images.shape == (1, 64, 64, 3)
    assert Client(server.http_url, "http").is_ready()


@pytest.mark.parametrize("model", ["txt2img", "default__unet", "default__text_encoder", "default__tokenizer"])
def test_perf_analyzer_measures_each_model(server, exported_repo, tmp_path, model):
    data = exported_repo / model / "perf_input.json"
    if model == "txt2img":  # the shipped file is 512x512 x 20 steps; keep the test short
        payload = json.loads(data.read_text())
        payload["data"][0].update(width=[64], height=[64], steps=[2])
        data = tmp_path / "small.json"
        data.write_text(json.dumps(payload))
    result = sdtrt("perf-analyzer", "-m", model, "--input-data", str(data), "-u", server.url, "-i", "grpc",
                   "--measurement-mode", "count_windows", "--measurement-request-count", "3",
                   "--stability-percentage", "999", "--max-trials", "8", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    throughput = [line for line in result.stdout.splitlines() if "Throughput:" in line]
    assert throughput and float(throughput[0].split()[-2]) > 0


def test_from_png_regenerates_the_same_pixels(server, tmp_path):
    first = sdtrt("txt2img", "a (lighthouse:1.2), [fog], oil painting", "--negative-prompt", "blurry, \"dark\"",
                  "--steps", "5", "--sampler", "DPM++ 2M", "--schedule-type", "Karras", "--cfg-scale", "6.5",
                  "--seed", "1234", "--width", "64", "--height", "64", "--batch-size", "2", "--clip-skip", "2",
                  "--subseed", "99", "--subseed-strength", "0.25", "--enable-hr", "--hr-scale", "1.5",
                  "--hr-upscaler", "Latent (nearest)", "--denoising-strength", "0.5",
                  "--url", server.url, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    source = tmp_path / "a" / "00002-1234.png"  # image 1 of the batch: the seed (A1111's rule), its variation seed
    info = sdtrt("png-info", str(source))
    assert info.returncode == 0
    assert "Seed: 1234," in info.stdout and "Variation seed: 100," in info.stdout
    assert "Hires upscale: 1.5, Hires upscaler: Latent (nearest)" in info.stdout
    assert "Version: sdtrt " in info.stdout
    settings = json.loads(sdtrt("png-info", str(source), "--json").stdout)
    assert settings["prompt"] == "a (lighthouse:1.2), [fog], oil painting"
    assert settings["negative_prompt"] == 'blurry, "dark"' and settings["enable_hr"] is True
    again = sdtrt("txt2img", "--from-png", str(source), "--url", server.url, "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    regenerated = tmp_path / "b" / "00001-1234.png"
    with Image.open(source) as a, Image.open(regenerated) as b:
        assert (np.asarray(a) == np.asarray(b)).all()
        assert a.info["parameters"] == b.info["parameters"]


def test_png_info_on_a_plain_png_says_what_is_missing(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = sdtrt("png-info", str(tmp_path / "plain.png"))
    assert result.returncode == 2 and "no `parameters` text chunk" in result.stderr


def test_cli_img2img_and_inpainting_through_the_server(server, tmp_path):
    from reference import sample_mask, sample_picture

    Image.fromarray(sample_picture(96, 64)).save(tmp_path / "init.png")
    Image.fromarray(sample_mask(64, 64)).save(tmp_path / "mask.png")
    result = sdtrt("img2img", "a red door", "--init-image", str(tmp_path / "init.png"), "--mask",
                   str(tmp_path / "mask.png"), "--resize-mode", "Crop and resize", "--denoising-strength", "0.8",
                   "--mask-blur", "2", "--steps", "4", "--seed", "5", "--width", "64", "--height", "64",
                   "--url", server.url, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "00001-5.png") as im:
        assert im.size == (64, 64)
        text = im.info["parameters"]
    assert "Denoising strength: 0.8" in text and "Resize mode: Crop and resize" in text and "Mask blur: 2" in text
    missing = sdtrt("img2img", "x", "--init-image", str(tmp_path / "nope.png"), "--url", server.url)
    assert missing.returncode == 2 and "nope.png does not exist" in missing.stderr


def test_sigterm_lets_the_requests_in_flight_finish(exported_repo, tmp_path):
    """A scale-in's SIGTERM: `sdtrt serve` waits for the generation under way (Triton, once told to stop,
    refuses every inference, the U-Net calls of running generations included), which answers; then it stops
    the server cleanly, as soon as nothing is in flight rather than at the end of --drain-timeout."""
    import threading

    from sdtrt.client import JobControl

    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdtrt", "serve", "-m", str(exported_repo), "--http-port", str(http), "--grpc-port",
         str(grpc), "--metrics-port", str(metrics), "--log-file", str(tmp_path / "server.log"),
         "--drain-timeout", "120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("ready:"):
                break
        client = Client(f"127.0.0.1:{grpc}")
        control = JobControl()
        outcome: dict = {}

        def long_request() -> None:
            try:
                outcome["result"] = client.txt2img("a long one", steps=40, width=512, height=512, seed=1,
                                                   control=control)
            except Exception as exc:  # reported below
                outcome["error"] = exc

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 60
        while (client.progress(control.request_id) or None) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.progress(control.request_id) is not None, "the request never started"
        proc.send_signal(signal.SIGTERM)
        worker.join(180)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"].images.shape == (1, 512, 512, 3)
        finished = time.monotonic()
        assert proc.wait(60) == 0
        assert time.monotonic() - finished < 30  # not the 120 s drain timeout
        rest = proc.stdout.read()
        assert "draining: 1 generations in flight" in rest and "drained" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
