"""What an export is made from, besides the checkpoint: one typed object that `sdtrt export` fills from its flags
and the export reads, instead of twenty keyword arguments passed down three calls."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sdtrt.contract.errors import UsageError
from sdtrt.contract.spec import ExportLimits
from sdtrt.export.tensorrt import EngineOptions
from sdtrt.model_repository.configs import ServingOptions


@dataclass(frozen=True)
class ExportOptions:
    """``name``: the model's name in the repository (default: the file's stem or the folder's name); ``default``:
    what requests that name no model get. ``loras`` (``FILE[:SCALE]``) are fused into the weights; ``lora_dir`` /
    ``embedding_dir`` are folders whose LoRAs and embeddings requests may use by name, ``max_lora_rank`` the summed
    rank one request's LoRAs may have. ``max_pixel_steps`` (0: none) and ``max_prompt_chars`` are per-request
    ceilings, sized from max_size, max_batch and max_chunks by default (ExportLimits). ``tiling`` adds the U-Net's
    and VAE's tiling variants (A1111's seamless Tiling) that requests with ``tiling`` run; ``hypertile`` their
    Hypertile variants (export/hypertile.py), which requests with the hypertile fields run. With ``engines``, also
    FP16 TensorRT engines, and the networks are served with them."""

    name: str | None = None
    default: bool = False
    config: str | Path | None = None
    loras: tuple[str, ...] = ()
    lora_dir: str | Path | None = None
    embedding_dir: str | Path | None = None
    max_lora_rank: int = ExportLimits.max_lora_rank
    vae: str | Path | None = None
    vae_dir: str | Path | None = None  # VAEs requests may pick by file name (export/vaes.py)
    upscaler_dir: str | Path | None = None  # upscaler models for the hires fix and Extras (export/upscalers.py)
    face_restorer_dir: str | Path | None = None  # GFPGAN / CodeFormer and facexlib's detector, parser (export/faces.py)
    interrogator_dir: str | Path | None = None  # A1111's DeepBooru file, for /interrogate (export/interrogators.py)
    controlnet_dir: str | Path | None = None  # ControlNets requests' units may select (export/controlnets.py)
    tiling: bool = False
    hypertile: bool = False
    allow_pickle: bool = False
    prediction_type: str | None = None
    max_batch: int = ExportLimits.max_batch
    min_size: int = ExportLimits.min_size
    max_size: int | None = None
    max_chunks: int = ExportLimits.max_chunks
    max_pixel_steps: int | None = None
    max_prompt_chars: int | None = None
    serving: ServingOptions = field(default_factory=ServingOptions)
    engines: EngineOptions | None = None
    progress: bool = True

    @property
    def backend(self) -> str:
        """The backend the networks are served on: TensorRT when engines are built, else the serving option's."""
        return "tensorrt" if self.engines is not None else self.serving.backend

    @property
    def served(self) -> ServingOptions:
        return replace(self.serving, backend=self.backend)

    def fitted(self, native: int, factor: int) -> "ExportOptions":
        """These options with every size and ceiling left to the model filled in and checked against it (its
        ``native`` side and VAE ``factor``)."""
        max_size = ExportLimits.largest(native) if self.max_size is None else self.max_size
        if self.min_size % factor or max_size % factor or not 0 < self.min_size <= native <= max_size:
            raise UsageError(
                f"--min-size {self.min_size} / --max-size {max_size} must be multiples of {factor} around the "
                f"model's native size {native}"
            )
        if self.max_batch < 1:
            raise UsageError(f"--max-batch must be >= 1, got {self.max_batch}")
        pixel_steps = self.max_pixel_steps
        chars = self.max_prompt_chars
        return replace(
            self, max_size=max_size,
            max_pixel_steps=ExportLimits.pixel_steps(max_size, self.max_batch) if pixel_steps is None else pixel_steps,
            max_prompt_chars=ExportLimits.prompt_chars(self.max_chunks) if chars is None else chars,
        )

    def key_inputs(self, key: str) -> dict:
        """The options that make an export what it is (not how it reports, nor which model is the default)."""
        skipped = {"name", "default", "allow_pickle", "progress"}
        return {"name": key, **{f: getattr(self, f) for f in self.__dataclass_fields__ if f not in skipped}}
