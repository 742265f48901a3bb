"""`asap bench`'s use case: what to measure. A checkpoint is exported to a temporary bundle, no
model at all means a random facades-preset model; engines/bench.py does the measuring."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def check_source(model: Path | None, bundle_dir: Path | None, engine_file: Path | None) -> None:
    """UsageError if more than one of --model / --bundle / --engine is given; MissingDependencyError
    (naming the extra) without torch: every run measures the authors' PyTorch forward as its
    baseline, so a run without it would only fail its baseline rows after the work."""
    from ..errors import UsageError, require_module

    given = [n for n, v in (("--model", model), ("--bundle", bundle_dir), ("--engine", engine_file)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give at most one of --model, --bundle, --engine (got {', '.join(given)})")
    require_module("torch", "asap bench (its baseline is the authors' PyTorch forward)", "torch")


@contextlib.contextmanager
def bench_bundle(model: Path | None = None, bundle_dir: Path | None = None, engine_file: Path | None = None,
                 fp16: bool = False, seed: int = 0,
                 status: Callable[[str], None] | None = None) -> Iterator[tuple[object, dict]]:
    """(loaded bundle, model info for the report) for one of --model / --bundle / --engine (or none:
    a random model); a temporary bundle is removed when the block ends, whatever happens."""
    from ..engines.bench import random_bundle
    from ..export.bundle import export_checkpoint, load_bundle

    check_source(model, bundle_dir, engine_file)
    say = status or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="asap_bench_") as tmp:
        if bundle_dir is not None or engine_file is not None:
            bundle = load_bundle(bundle_dir if bundle_dir is not None else engine_file.parent)
            info = {"description": f"bundle {bundle.path}"}
        elif model is not None:
            say("exporting the checkpoint to a temporary bundle")
            bundle = load_bundle(export_checkpoint(model, Path(tmp) / "bundle", fp16=fp16).path)
            info = {"description": f"checkpoint {model}"}
        else:
            say("making a random facades-preset model and exporting it")
            bundle = random_bundle(Path(tmp) / "bundle", "facades", seed=seed, fp16=fp16)
            info = {"description": "randomly initialised facades-preset model (13 labels, S=64, published widths)"}
        info.update({"S": bundle.config.S, "config": bundle.config.to_dict()})
        yield bundle, info
