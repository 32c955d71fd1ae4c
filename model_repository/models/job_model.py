"""What the job models (txt2img, img2img) share: a request read into its plan, run through the networks' Triton
models in one of the instance's loop threads, with progress, metrics and a structured log line (importable only
inside Triton's Python stub)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from sdtrt.contract.errors import Unavailable
from sdtrt.contract.previews import latent_preview
from sdtrt.contract.samplers import DEFAULT_SCHEDULE, SAMPLERS, make_scheduler, step_kwargs
from sdtrt.contract.spec import (
    ENGINES,
    IMAGES,
    INFOTEXTS,
    MODEL,
    PROGRESS,
    PROGRESS_PREVIEW,
    PROGRESS_REQUEST_ID,
    PROGRESS_STEP,
    PROGRESS_TOTAL,
    SEEDS,
    ModelSpec,
    load_catalog,
)
from sdtrt.model_repository.configs import (CONTROL_PICTURES, IN_PROCESS, LOOP_NETWORKS_PARAMETER, LOOPS_PARAMETER,
                                            engine_batching)
from sdtrt.model_repository.models.bls import BlsNetworks, StepCalls, exec_within
from sdtrt.model_repository.models.loop_networks import LoopNetworks
from sdtrt.model_repository.models.metrics import Metrics
from sdtrt.model_repository.models.step_batcher import StepBatcher
from sdtrt.model_repository.models.triton_io import JsonLog, PerRequestModel, optional_input, repo_root, scalar
from sdtrt.pipeline import jobs
from sdtrt.pipeline.ksampling import k_diffusion
from sdtrt.requests.extra_networks import LoraLibrary, RequestLoras
from sdtrt.requests.generation import infotexts
from sdtrt.requests.plan import Plan, plan_request
from sdtrt.requests.request import job_fields


def instance_device(args: dict[str, str]) -> "torch.device":
    """The device a Python model instance works on: its GPU for ``KIND_GPU`` instances (when this torch has
    CUDA), else the CPU."""
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return torch.device("cuda", int(args.get("model_instance_device_id") or 0))
    return torch.device("cpu")


PROGRESS_INTERVAL = 0.25  # seconds between a request's progress posts
PROGRESS_DEADLINE_S = 5.0  # a post takes well under a millisecond; a progress model that hangs must not stop a loop


def post_progress(request_id: str, done: int, total: int, log: JsonLog, preview: np.ndarray | None = None) -> None:
    """Record a request's steps (and its latest preview picture) in the ``progress`` model; never fails the
    generation."""
    inputs = [pb_utils.Tensor(PROGRESS_REQUEST_ID, np.array([request_id.encode()], dtype=np.object_)),
              pb_utils.Tensor(PROGRESS_STEP, np.array([done], np.int32)),
              pb_utils.Tensor(PROGRESS_TOTAL, np.array([total], np.int32))]
    if preview is not None:
        inputs.append(pb_utils.Tensor(PROGRESS_PREVIEW, np.ascontiguousarray(preview, dtype=np.uint8)))

    request = pb_utils.InferenceRequest(model_name=PROGRESS, inputs=inputs, requested_output_names=[PROGRESS_STEP])
    try:
        response = exec_within(request, PROGRESS, PROGRESS_DEADLINE_S)
    except Unavailable as exc:
        log.warn("progress_not_posted", request_id=request_id, error=str(exc))
        return
    if response.has_error():
        log.warn("progress_not_posted", request_id=request_id, error=response.error().message())


def unet_rows(spec: ModelSpec) -> int:
    """The most rows one U-Net call may carry: the spec's batch range, or what its TensorRT engine was built for
    (0 for an engine of fixed batch, which takes each loop's call only as it is)."""
    unet = spec.component("unet")
    engine = spec.extra.get(ENGINES, {}).get("unet")
    if engine is not None:
        return engine_batching(spec, unet, engine["profile"]).max_batch_size
    return spec.dims[unet.inputs[0].shape[0]].max


class JobModel(PerRequestModel):
    """What the job models (txt2img, img2img) share: reading and checking a job's fields, the networks of one
    request and its structured log line. Subclasses set ``job`` and write ``run``.

    One instance (one process) runs up to ``loops`` requests at once, each in its own thread: the loop's work
    between U-Net calls is small, BLS calls release the GIL while they wait, and one process instead of one per
    loop imports torch and diffusers once (a ready server in seconds, not half a minute). ``execute`` hands a
    request to a free loop and returns; the loop sends the response itself (the response sender, one final
    response, as non-decoupled models may since Triton 24.07). While every loop is busy, ``execute`` waits for
    one to finish, so further requests stay in Triton's queue: its max_queue_size answers UNAVAILABLE beyond it
    and its queue metrics keep telling the truth."""

    job = None  # a sdtrt.model_repository.configs.Job

    def initialize(self, args):
        config = json.loads(args["model_config"])
        # (absent from configs an earlier sdtrt generated, with one instance per loop: one loop each, as then)
        self.loops = int(config["parameters"].get(LOOPS_PARAMETER, {}).get("string_value", 1))
        self.free_loops = threading.BoundedSemaphore(self.loops)
        self.pool = ThreadPoolExecutor(max_workers=self.loops, thread_name_prefix="loop")
        self.repo = repo_root(args)
        self.catalog = load_catalog(self.repo)
        self.lora_libraries: dict = {}
        self.metrics = Metrics()
        self.current = threading.local()  # the request a loop thread is running: its labels and step count
        self.batcher = StepBatcher(on_merge=lambda loops: self.metrics.step_batch(self.job.name, loops))
        self.log = JsonLog(args["model_name"])
        self.fields = job_fields(self.job.request_type)
        self.device = instance_device(args)
        if args.get("model_instance_kind") == "GPU" and self.device.type == "cpu":
            self.log.warn("no_cuda", reason="a GPU instance, but this torch has no CUDA: the loop runs on the CPU")
        torch.set_num_threads(1)  # the loop's own math is small; leave the cores to the networks
        parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.local = None
        if parameters.get(LOOP_NETWORKS_PARAMETER) == IN_PROCESS:
            self.local = LoopNetworks(self.repo, parameters.get("engine", "onnxruntime"),
                                      parameters.get("precision", "fp32"))
        self.warm_up()
        self.log.info("ready", instance=args.get("model_instance_name"), device=str(self.device), loops=self.loops,
                      models=list(self.catalog.models), default=self.catalog.default,
                      loop_networks=IN_PROCESS if self.local is not None else "bls")

    def execute(self, requests):
        for request in requests:
            self.free_loops.acquire()  # blocks while every loop is busy: the next requests wait in Triton's queue
            self.metrics.running(self.job.name, 1)
            self.pool.submit(self._loop, request)
        return None

    def _loop(self, request) -> None:
        try:
            response = self.respond(request)
            request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # the client may be gone; the loop must come back whatever happened
            self.log.error("send_failed", request_id=request.request_id(), error=repr(exc))
        finally:
            self.metrics.running(self.job.name, -1)
            self.free_loops.release()

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run(self, request) -> "pb_utils.InferenceResponse":
        """The request read once into its plan, run through the networks' Triton models, answered with the
        pictures, their seeds and their infotexts (written from the same plan)."""
        start = time.perf_counter()
        plan = self.plan(request)
        images, seeds = jobs.run(plan, self.networks(request, plan), self.on_step, self.stage,
                                 lambda other: self.networks(request, other))
        self.done(request, plan, start)
        texts = np.array([text.encode("utf-8") for text in infotexts(plan)], dtype=np.object_)
        return pb_utils.InferenceResponse([
            pb_utils.Tensor(IMAGES, images), pb_utils.Tensor(SEEDS, np.array(seeds, dtype=np.int64)),
            pb_utils.Tensor(INFOTEXTS, texts),
        ])

    def networks(self, request, plan: Plan) -> BlsNetworks:
        """One model's networks for one request (with the LoRAs its plan names), called through BLS from this
        instance's device."""
        spec = plan.spec
        if spec.key not in self.lora_libraries:  # each LoRA file is read once per instance, when first used
            self.lora_libraries[spec.key] = LoraLibrary(self.repo, spec.loras)
        loras = RequestLoras(self.lora_libraries[spec.key], list(plan.loras))
        steps = StepCalls(self.batcher, unet_rows(spec), self.local)
        return BlsNetworks(spec, request, self.device, loras, steps, plan.request.tiling, plan.request.vae)

    def warm_up(self) -> None:
        """Import every sampler's scheduler and run one step on this instance's device, so that no request pays
        for first use (each instance would otherwise make its first request ~2x slower; on a GPU this also
        creates the CUDA context)."""
        spec = self.catalog.get()
        # One sampler per scheduler class: the imports are what first use costs (the schedule variants of one
        # class share them), and a class can take ~0.2 s to build (DPM2): not to pay 20 times at every start.
        firsts = {sampler.scheduler: name for name, sampler in reversed(SAMPLERS.items()) if sampler.scheduler}
        k_diffusion()  # and k-diffusion's sampling (scipy, torchsde, torchdiffeq), for the samplers it runs
        for name in firsts.values():
            scheduler = make_scheduler(name, spec.scheduler_config, DEFAULT_SCHEDULE, spec.schedules, [0])
            scheduler.set_timesteps(2, device=self.device)
        latents = torch.zeros(1, spec.latent_channels, 8, 8, device=self.device)
        t = scheduler.timesteps[0]
        scheduler.step(scheduler.scale_model_input(latents, t), t, latents,
                       **step_kwargs(scheduler, [torch.Generator().manual_seed(0)]))

    def plan(self, request) -> Plan:
        """The plan of the request (sdtrt.requests.plan): the model it names (absent: the default), every field
        of the job defaulted from that model's spec when absent and checked, seeds resolved, prompts read, and
        img2img's pictures prepared."""
        # A label only for a model this server has: a raw request string as a label would grow the metrics
        # without bound (every distinct typo a new series).
        named = scalar(request, MODEL) or self.catalog.default
        self.current.labels = {"model": named if named in self.catalog.models else "(unknown)", "sampler": ""}
        self.current.steps = 0
        self.current.request_id, self.current.posted = request.request_id(), 0.0
        spec = self.catalog.get(scalar(request, MODEL))
        self.current.preview = spec.latent_preview
        values = {name: scalar(request, name) for name in self.fields}
        pictures = {name: optional_input(request, name) for name in self.job.pictures}
        controls = {name: optional_input(request, name) for name in CONTROL_PICTURES}
        plan = plan_request(self.job.request_type(**values), spec, **pictures, others=self.catalog.get,
                            control_pictures=controls)
        self.current.labels = {"model": spec.key, "sampler": plan.request.sampler}
        return plan

    def on_step(self, done: int, total: int, latents: "torch.Tensor") -> None:
        """The loop's step callback: counts the U-Net steps a request runs and, for a request that carries an id,
        posts its progress to the ``progress`` model (its first and last step, and every PROGRESS_INTERVAL
        between: a BLS call of well under a millisecond, a few times a second) with a preview of its latents when
        the model has a preview map (a small matrix product, no VAE)."""
        self.current.steps = getattr(self.current, "steps", 0) + 1
        request_id = getattr(self.current, "request_id", "")
        now = time.monotonic()
        if request_id and (done in (1, total) or now - self.current.posted >= PROGRESS_INTERVAL):
            self.current.posted = now
            matrix = getattr(self.current, "preview", None)
            preview = latent_preview(latents.detach().float().cpu().numpy(), matrix) if matrix else None
            post_progress(request_id, done, total, self.log, preview)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time one stage of a request into sdtrt_stage_duration_seconds; while a loop denoises, the step batcher
        counts it among the loops whose U-Net calls it merges."""
        start = time.perf_counter()
        with self.batcher.denoising() if name == "denoise" else contextlib.nullcontext():
            yield
        self.metrics.stage(self.job.name, name, time.perf_counter() - start)

    def outcome(self, request, outcome: str) -> None:
        labels = {"model": "", "sampler": "", **getattr(self.current, "labels", {})}
        self.metrics.request(self.job.name, labels["model"], labels["sampler"], outcome)
        self.metrics.steps(self.job.name, labels["model"], getattr(self.current, "steps", 0))
        self.current.labels, self.current.steps = {}, 0

    def done(self, request, plan: Plan, start: float) -> None:
        spec, settings = plan.spec, plan.request
        extra = {"inpaint": plan.inpaint} if plan.img2img else {}
        self.metrics.duration(self.job.name, spec.key, time.perf_counter() - start)
        self.log.info("sampled", request_id=request.request_id(), model=spec.key, sampler=settings.sampler,
                      steps=settings.steps,
                      size=f"{settings.width}x{settings.height}", images=settings.batch_size, seed=settings.seed,
                      hires=settings.enable_hr, ms=round(1000 * (time.perf_counter() - start), 1), **extra)
