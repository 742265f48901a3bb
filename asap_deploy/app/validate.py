"""`asap validate`: compare a bundle's backends with the PyTorch reference (engines/validate.py
does the comparing; this is the use case: what to compare, on what, against which reference)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import UsageError
from ..io import derived_name
from ..limits import check_file_arg, check_optional, check_seed
from .paths import check_bundle_arg


def default_report_dir(bundle_dir: Path) -> Path:
    """BUNDLE-validation next to the bundle (its name shortened to fit if need be)."""
    return bundle_dir.with_name(derived_name(bundle_dir.name, "-validation"))


def run_validate(bundle_dir: str | os.PathLike, backends: Sequence[str] = (), *, labels: Path | None = None,
                 random: int | None = None, precision: str = "fp32", checkpoint: Path | None = None,
                 report: Path | None = None, seed: int = 0, progress: Callable[[str], None] | None = None,
                 engine_options: Mapping[str, Mapping[str, Any]] | None = None):
    """Check every argument before any work, then compare; returns (ValidationReport, backend
    names, number of sample batches). `backends`: those to compare (each must list `precision` in
    its registry row); none: engines.validate.validation_backends' default for the precision
    (onnxruntime; bf16: openvino). `engine_options`: per backend name, the keyword arguments its
    Engine is opened with (e.g. {"tensorrt": {"flavor": "rtx"}})."""
    from ..engines import create_engine
    from ..engines.validate import (MAX_LABEL_MAPS, check_bundle_precision, folder_samples, random_samples,
                                    reference_engine, validate, validation_backends)
    from ..errors import CheckpointError
    from ..export.bundle import load_bundle
    from ..precisions import check_precision

    bundle_dir = Path(bundle_dir)
    check_precision(precision)
    check_optional("--random", random, 1, MAX_LABEL_MAPS)
    check_seed("--seed", seed)
    if checkpoint is not None:
        check_file_arg("--checkpoint", checkpoint, "checkpoint", error=CheckpointError)
    names = validation_backends(backends, precision, bundle_dir)
    if labels is not None and random is not None:
        raise UsageError("give either --labels or --random, not both")
    check_bundle_arg("BUNDLE_DIR", bundle_dir, model_option=None)
    bundle = load_bundle(bundle_dir)
    check_bundle_precision(bundle, precision)  # int8 without `asap quantize`: said before any work
    cfg = bundle.config
    samples = folder_samples(cfg, labels) if labels is not None else random_samples(cfg, random or 4, seed)
    reference = reference_engine(bundle, checkpoint)
    engines = [create_engine(n, bundle, precision, **dict((engine_options or {}).get(n, {}))) for n in names]
    rep = validate(bundle, reference, engines, samples, precision, report or default_report_dir(bundle_dir),
                   progress=progress)
    return rep, names, len(samples)
