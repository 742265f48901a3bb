"""`asap bench`'s use case: what to measure. A checkpoint is exported to a temporary bundle, no
model at all means a random facades-preset model; engines/bench.py does the measuring."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

# the reporting helpers `asap bench` prints with (engines/bench_report.py)
from ..engines.bench_report import (TERMINAL_COLUMNS, failure_lines, footnotes, machine_text, row_line,  # noqa: F401
                                    settings_text, sgemm_text, skipped_lines, table_rows, write_reports)

DEFAULT_OUT = Path("asap_bench")  # the default report folder (a new one per run: asap_bench2, ...)


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


def bench_options(names: Sequence[str], sizes: Sequence[str], batches: Sequence[int], precisions: Sequence[str], *,
                  warmup: float, iterations: int, duration: float, memory: bool, seed: int, max_pixels: int,
                  threads: int | None, sgemm: bool = True):
    """engines.bench.BenchOptions of the command's options, checked (no backend named: the defaults,
    narrowed to those usable here once the bundle is known)."""
    from ..engines.bench import DEFAULT_BACKENDS, BenchOptions, parse_size
    from ..limits import check_max_pixels

    check_max_pixels("--max-pixels", max_pixels)
    opts = BenchOptions(backends=list(names) or list(DEFAULT_BACKENDS), sizes=[parse_size(s) for s in sizes],
                        batches=batches, precisions=list(precisions), warmup_s=warmup, min_iters=iterations,
                        min_seconds=duration, memory=memory, seed=seed, max_pixels=max_pixels, threads=threads,
                        sgemm=sgemm)
    opts.check()
    return opts


def check_outputs(out: Path | None, json_file: Path | None, overwrite: bool,
                  sources: Sequence[Path]) -> tuple[Path, bool]:
    """(the report folder, whether it is numbered) after checking that the reports may be written
    there (and to --json) without touching the sources; before any measuring."""
    from ..engines.bench_report import check_report_outputs, numbered_dir
    from ..limits import check_output_file

    if json_file is not None:
        check_output_file("--json", json_file)
    numbered = out is None and not overwrite  # the default folder: a new one per run (asap_bench, asap_bench2, ...)
    out = DEFAULT_OUT if out is None else out
    check_report_outputs(numbered_dir(out) if numbered else out, json_file, overwrite, list(sources))
    return out, numbered


def run_rows(opts, default_backends: bool, precisions: Sequence[str], model: Path | None, bundle_dir: Path | None,
             engine_file: Path | None, seed: int, *, say: Callable[[str], None],
             planned: Callable[[int], None] | None = None, progress: Callable[[str], None] | None = None,
             on_row: Callable[[dict, int, int], None] | None = None) -> dict:
    """Measure every row of `opts` on the bundle of --model / --bundle / --engine (or a random model);
    default_backends: the backends usable here replace opts.backends. planned(n) gets the row count
    before the first row; the report."""
    from ..engines.bench import ALL, default_backends as usable_backends, planned_rows, run_bench

    every = ALL in precisions  # --precision all: a model exported here gets its fp16 graphs too
    with bench_bundle(model, bundle_dir, engine_file, every or "fp16" in precisions, seed, say) as (bundle, info):
        if default_backends:
            opts.backends = usable_backends(bundle.path, ALL if every else precisions[0],
                                            engine_given=engine_file is not None)
        if planned is not None:
            planned(planned_rows(opts, bundle))
        return run_bench(bundle, opts, progress=progress, model_info=info, on_row=on_row)
