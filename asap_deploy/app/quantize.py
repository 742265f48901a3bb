"""`asap quantize` as a library: read calibration label maps exactly as `asap infer` reads them,
pick a deterministic subset, quantize the bundle's graphs (engines/quantize.py), gate them against
the bundle's fp32 graphs, and add them to the bundle atomically (export.bundle.add_precision).
No torch.

    summary = run_quantize("bundle", QuantizeRequest(calib=["maps/"], samples=8))
    summary.written        False when the gate failed without --force (nothing was written)
    summary.result.gate    per-stage metrics vs THRESHOLDS["int8"]

Nothing is written before the gate has run: an error, a failed gate or Ctrl-C at any point leaves
the bundle byte-identical and loading (add_precision builds the new bundle next to it and swaps).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError, OutputError, UsageError
from ..io import DEFAULT_MAX_PIXELS, read_instance_map, read_regular_file
from ..precisions import QUANTIZED

# the engines' quantizer and the bundle writer (re-exported: the CLI reads them from here)
from ..engines.quantize import (ACTIVATIONS, AUTO, DEFAULT_METHOD, LAYER_POLICIES, MAX_CALIBRATION_PIXELS,  # noqa: F401
                                MAX_HOLDOUT, MAX_SAMPLES, METHODS, PIXELWISE_CHOICES, CalibrationMap, QuantizeOptions,
                                QuantizeResult, check_method_available, parse_keep_float, quantize_bundle)

DEFAULT_SAMPLES = 8
DEFAULT_HOLDOUT = 4

Progress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass
class QuantizeRequest:
    calib: Sequence[str | os.PathLike]  # label PNG files, folders of them, globs (as asap infer takes them)
    method: str = DEFAULT_METHOD
    samples: int = DEFAULT_SAMPLES
    holdout: int = DEFAULT_HOLDOUT
    layers: str = "heavy"
    # Conv names / 'pixelwise' kept fp32; 'auto' (the default: also when empty) finds layers when the gate
    # fails, on top of any names; names alone disable it; 'none': nothing kept (engines.quantize.parse_keep_float)
    keep_float: tuple[str, ...] = (AUTO,)
    pixelwise: str = "fp32"
    activations: str = "uint8"  # int8: symmetric, what TensorRT builds (asap build-engine --int8)
    overwrite: bool = False
    force: bool = False
    seed: int = 0
    palette: str | None = None  # None: the bundle's
    instances: Path | None = None  # folder (or file) of instance maps, for models with instance edges
    max_pixels: int = DEFAULT_MAX_PIXELS
    sensitivity: str = "on-failure"  # "always" with --sensitivity
    top: int = 3

    def options(self) -> QuantizeOptions:
        names, auto_keep = parse_keep_float(self.keep_float)
        return QuantizeOptions(method=self.method, layers=self.layers, keep_float=names, auto_keep=auto_keep,
                               pixelwise=self.pixelwise, activations=self.activations, sensitivity=self.sensitivity,
                               top=self.top, seed=self.seed)

    def check(self) -> None:
        """UsageError for a bad option, before anything is read."""
        from ..limits import check_max_pixels, check_range

        self.options().check()
        check_range("--samples", self.samples, 1, MAX_SAMPLES)
        check_range("--holdout", self.holdout, 0, MAX_HOLDOUT)
        check_max_pixels("--max-pixels", self.max_pixels)
        if not list(self.calib):
            raise UsageError("no calibration maps: give label PNGs, folders or globs with --calib")


@dataclass
class QuantizeSummary:
    bundle: Path
    written: bool
    result: QuantizeResult
    calibration: list[Path]
    evaluation: list[Path]
    found: int  # maps found in --calib
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.result.gate.passed

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle), "written": self.written, "passed": self.passed,
                "seconds": round(self.seconds, 2), "maps_found": self.found,
                "calibration": [str(p) for p in self.calibration], "evaluation": [str(p) for p in self.evaluation],
                "notes": self.notes, "quantization": self.result.description}


def find_maps(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """The label PNGs of `specs` (files, folders, globs: app.infer.discover_inputs), or InputError
    naming the first spec that names none (an empty folder, a folder without PNGs, a pattern that
    matches nothing, a missing file)."""
    from .infer import discover_inputs

    paths, problems = discover_inputs(specs)
    if problems:
        spec, msg = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"--calib {msg}{more}")
    not_png = [p for p in paths if p.suffix.lower() != ".png"]
    if not_png:
        raise InputError(f"--calib {not_png[0]}: not a PNG label map")
    if not paths:
        raise InputError("--calib: no label PNGs found")
    return paths


def choose(paths: Sequence[Path], samples: int, holdout: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(calibration maps, held-out maps): the paths sorted, shuffled with `seed`, the first
    `samples` (all of them when fewer) to calibrate and up to `holdout` of the rest to evaluate on;
    the same inputs and seed always give the same subset, whatever order they were named in."""
    order = sorted(paths, key=lambda p: str(p))
    perm = np.random.default_rng(seed).permutation(len(order))
    shuffled = [order[i] for i in perm]
    return shuffled[:samples], shuffled[samples:samples + holdout]


def read_map(path: Path, cfg, palette, req: QuantizeRequest) -> CalibrationMap:
    """One label PNG as `asap infer` reads it (ids or palette colours, ids checked against the
    model's label set: an InputError naming the file and the pixel), padded to whole tiles as infer
    pads it; its sha256 from the same bytes."""
    from .infer import decode_label_map, match_by_name

    data = read_regular_file(path, "label map", max(1 << 20, req.max_pixels * 8))  # bounded: header-checked below
    digest = hashlib.sha256(data).hexdigest()
    lab = decode_label_map(path, cfg, palette, req.max_pixels)
    inst = None
    if cfg.instance_edges:
        if req.instances is None:
            raise InputError(f"{path}: this model uses instance maps: pass --instances FOLDER")
        ipath = match_by_name(path, Path(req.instances), "instance map")
        inst = read_instance_map(ipath, req.max_pixels)
        if inst.shape != lab.shape:
            raise InputError(f"{path}: its instance map {ipath} is {inst.shape[1]}x{inst.shape[0]}, "
                             f"the label map {lab.shape[1]}x{lab.shape[0]}")
        inst = cfg.pad_to_tiles(inst)
    return CalibrationMap(path.name, digest, np.ascontiguousarray(cfg.pad_to_tiles(lab)), inst, tuple(lab.shape))


def check_total_pixels(paths: Sequence[Path], cfg, max_pixels: int) -> None:
    """InputError (before any map is decoded: headers only) when the maps, padded to whole tiles,
    hold more than MAX_CALIBRATION_PIXELS: they are all held in memory and run through the model."""
    from ..io import open_image

    total = 0
    for p in paths:
        im = open_image(p, max_pixels)
        w, h = im.size
        im.close()
        ph, pw = cfg.padded_size(h, w)
        total += ph * pw
        if total > MAX_CALIBRATION_PIXELS:
            raise InputError(f"--calib: the {len(paths)} maps chosen hold more than {MAX_CALIBRATION_PIXELS:,} pixels "
                             f"(the limit, reached at {p}); pass fewer --samples / --holdout or smaller maps")


def run_quantize(bundle_dir: str | os.PathLike, req: QuantizeRequest, progress: Progress | None = None) -> QuantizeSummary:
    """Run `asap quantize`: checks, reading, quantization, gate, and (passed or --force) the write."""
    from ..export.bundle import BUNDLE_KIND, add_precision, load_bundle
    from ..io import check_replaceable
    from ..palette import load_palette
    from .paths import check_bundle_arg

    t0 = time.perf_counter()
    req.check()
    check_bundle_arg("BUNDLE", Path(bundle_dir), model_option=None)
    check_method_available(req.method)  # a missing NNCF is said before any work
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)  # every file's sha256 checked
    if QUANTIZED in bundle.precisions and not req.overwrite:
        raise OutputError(f"{bundle_dir}: already holds {QUANTIZED} graphs (asap quantize ran on it); pass --overwrite "
                          "to replace them")
    paths = find_maps(req.calib)
    check_replaceable(bundle_dir, BUNDLE_KIND, "bundle", paths)  # ours in full, and no map inside it
    calib_paths, eval_paths = choose(paths, req.samples, req.holdout, req.seed)
    notes = []
    if len(paths) < req.samples:
        notes.append(f"{len(paths)} map(s) found, fewer than --samples {req.samples}: all of them calibrate")
    if not eval_paths:
        notes.append("no maps left for a held-out check: the fidelity gate runs on the calibration maps")
    palette = load_palette(req.palette, bundle.config, bundle.manifest)
    wanted = [*calib_paths, *eval_paths]
    check_total_pixels(wanted, bundle.config, req.max_pixels)
    maps: list[CalibrationMap] = []
    for k, p in enumerate(wanted):
        maps.append(read_map(p, bundle.config, palette, req))
        if progress:
            progress("reading label maps", k + 1, len(wanted))
    calib, held = maps[:len(calib_paths)], maps[len(calib_paths):]
    result = quantize_bundle(bundle, calib, held, req.options(), progress)
    written = False
    if result.gate.passed or req.force:
        result.description["fidelity"]["forced"] = not result.gate.passed
        add_precision(bundle_dir, QUANTIZED, result.graphs, result.description, overwrite=req.overwrite,
                      inputs=paths, progress=(lambda msg: progress("writing the bundle", 0, 0)) if progress else None)
        written = True
    return QuantizeSummary(bundle_dir, written, result, calib_paths, eval_paths, len(paths),
                           time.perf_counter() - t0, notes)
