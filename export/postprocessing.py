"""The networks a model is exported with for what A1111 does with a finished picture: its upscaler models
(``--upscalers``, export/upscalers.py), face restorers (``--face-restorers``, export/faces.py) and interrogators
(``--interrogators``, export/interrogators.py), read from their folders together. These folders are outside the model's own export key (``export_base``): an export that differs
from an earlier one only there adds, replaces and removes these networks alone (sdtrt.export.add_postprocessing)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sdtrt.contract.hires import HIRES_UPSCALERS
from sdtrt.contract.spec import (CAPTION_BEAMS, CAPTION_ROWS, CAPTION_TOKENS, CLIP_INTERROGATOR, CLIP_TEXTS,
                                 CLIP_TEXTS_A_CALL, FACE_DETECTOR, FACE_PARSER, SINGLE, DimRange, ModelSpec,
                                 face_restorer_component, interrogator_component, upscaler_component)
from sdtrt.export.networks.descriptors import Descriptor
from sdtrt.export.faces import DETECT_DIMS, register_face_restorers
from sdtrt.export.interrogators import register_interrogators
from sdtrt.export.options import ExportOptions
from sdtrt.export.upscalers import TILE_DIMS, register_upscalers

FOLDERS = ("upscaler_dir", "face_restorer_dir", "interrogator_dir")  # the export options they are read from


@dataclass(frozen=True)
class Postprocessing:
    """What the two folders register: the networks to export and the spec's entries for them."""

    networks: list[Descriptor] = field(default_factory=list)
    upscalers: dict[str, dict] = field(default_factory=dict)  # ModelSpec.upscalers
    face_restorers: dict[str, dict] = field(default_factory=dict)  # ModelSpec.face_restorers
    face_helpers: dict[str, dict] = field(default_factory=dict)  # spec.extra["face_helpers"]: detector, parser
    interrogators: dict[str, dict] = field(default_factory=dict)  # ModelSpec.interrogators

    def dims(self) -> dict[str, DimRange]:
        clip = self.interrogators.get(CLIP_INTERROGATOR)
        caption = {CAPTION_ROWS: DimRange(CAPTION_BEAMS[0], 1, CAPTION_BEAMS[1]),
                   CAPTION_TOKENS: DimRange(1, 24, clip["caption_tokens"]),
                   CLIP_TEXTS: DimRange(1, CLIP_TEXTS_A_CALL // 2, CLIP_TEXTS_A_CALL)} if clip else {}
        return {**(TILE_DIMS if self.upscalers else {}), **(DETECT_DIMS if self.face_restorers else {}),
                **({SINGLE: DimRange(1, 1, 1)} if self.interrogators else {}), **caption}

    def registered(self) -> dict[str, tuple[str, ...]]:
        """The names the request fields choose from (ModelLimits' upscalers and face_restorers)."""
        return {"upscalers": tuple(self.upscalers), "face_restorers": tuple(self.face_restorers)}

    def files(self) -> dict[str, str]:
        """Each network's name -> the sha256 of the file it is made from (a changed file: a network to export)."""
        out = {upscaler_component(e["slug"]): e["sha256"] for e in self.upscalers.values()}
        out |= {face_restorer_component(e["slug"]): e["sha256"] for e in self.face_restorers.values()}
        for name, entry in self.interrogators.items():  # one network a file, or the file's networks and theirs
            out |= entry.get("networks", {interrogator_component(name): entry["sha256"]})
        helpers = {"detector": FACE_DETECTOR, "parser": FACE_PARSER}
        return out | {helpers[kind]: e["sha256"] for kind, e in self.face_helpers.items()}

    def applied(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with these entries, and its request fields' choices of them, instead of its own."""
        request = dict(spec.request)
        request["hr_upscaler"] = replace(spec.field("hr_upscaler"), choices=(*HIRES_UPSCALERS, *self.upscalers))
        request["face_restorer"] = replace(spec.field("face_restorer"), choices=("", *self.face_restorers))
        extra = {k: v for k, v in spec.extra.items() if k != "face_helpers"}
        extra |= {"face_helpers": self.face_helpers} if self.face_helpers else {}
        return replace(spec, upscalers=self.upscalers, face_restorers=self.face_restorers,
                       interrogators=self.interrogators, request=request, extra=extra, dims={**spec.dims, **self.dims()})


def of_spec(spec: ModelSpec) -> Postprocessing:
    """What an exported model was registered with (no networks: those are in its repository)."""
    return Postprocessing([], spec.upscalers, spec.face_restorers, spec.extra.get("face_helpers", {}), spec.interrogators)


def read_postprocessing(options: ExportOptions, report=print) -> Postprocessing:
    """The export's upscaler and face restorer folders read, every file checked."""
    networks: list[Descriptor] = []
    upscalers, restorers, helpers = {}, {}, {}
    if options.upscaler_dir is not None:
        found, upscalers = register_upscalers(Path(options.upscaler_dir), options.allow_pickle, report)
        networks += found
    if options.face_restorer_dir is not None:
        found, restorers, helpers = register_face_restorers(Path(options.face_restorer_dir), options.allow_pickle,
                                                            report)
        networks += found
    interrogators = {}
    if options.interrogator_dir is not None:
        found, interrogators = register_interrogators(Path(options.interrogator_dir), options.allow_pickle, report)
        networks += found
    return Postprocessing(networks, upscalers, restorers, helpers, interrogators)
