"""`asap build-engine`'s use case: check the arguments (a checkpoint where the bundle goes gets the
one command that exports and builds it), then build the TensorRT / TensorRT-RTX engines of a
bundle; and the restart TensorRT-RTX's parser may need (LD_LIBRARY_PATH is read at process start)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from ..plugins import trt_compat
from .options import check_output_file, check_shape
from .pipeline import checkpoint_for_bundle

ENGINE_COLUMNS = ("engine", "MiB", "targets", "plugin kernels", "from", "s")
T = TypeVar("T")


def with_rtx_restart(run: Callable[[], T], note: Callable[[str], None]) -> T:
    """run(); if TensorRT-RTX's parser library is not on LD_LIBRARY_PATH, note() what happens and
    restart this process with it (never returns then)."""
    try:
        return run()
    except trt_compat.RtxLibraryPathError as exc:
        note(exc.message)
        trt_compat.reexec_with_library_path(exc.folder)
        raise  # not reached: the process was replaced


def check_build_args(bundle_dir: Path, *, flavor: str | None, fp16: bool, arch: str | None, stage: str,
                     min_shape: str | None, opt_shape: str | None, max_shape: str | None,
                     timing_cache: Path | None, int8: bool = False) -> None:
    """Every argument, before any work."""
    from ..errors import UsageError

    if fp16 and int8:
        raise UsageError("--fp16 and --int8 build different engines: give one of them")
    # a checkpoint where the bundle goes: say which one command exports, builds and validates it
    checkpoint_for_bundle(bundle_dir, flavor=flavor or trt_compat.default_flavor(), fp16=fp16, arch=arch, stage=stage)
    for option, text in (("--min", min_shape), ("--opt", opt_shape), ("--max", max_shape)):
        check_shape(option, text)
    if timing_cache is not None:
        check_output_file("--timing-cache", timing_cache)  # read and written: never a FIFO or device


@dataclass
class BuildResult:
    flavor: str
    built: list  # engines.build.BuiltEngine

    def rows(self) -> list[tuple[str, ...]]:
        """One row of ENGINE_COLUMNS per engine."""
        rows = []
        for b in self.built:
            sc = b.sidecar
            pl = sc["plugin"]
            rows.append((b.path.name, f"{sc['engine']['bytes'] / 2**20:.1f}",
                         ",".join(f"sm_{s}" for s in sc["targets"]["sm"]),
                         ",".join(f"sm_{s}" for s in pl["kernel_archs"]) if pl else "-", sc["source_onnx"]["file"],
                         f"{b.seconds:.1f}"))
        return rows

    def sidecars(self) -> Sequence[dict]:
        return [b.sidecar for b in self.built]


def build_engine(bundle_dir: Path, *, flavor: str | None, stage: str, fp16: bool, arch: str | None,
                 min_shape: str | None, opt_shape: str | None, max_shape: str | None, out: Path | None,
                 timing_cache: Path | None, overwrite: bool,
                 progress: Callable[[str], None] | None = None, int8: bool = False) -> BuildResult:
    """Build the engines of `stage` from the bundle (default flavor: tensorrt if installed, else rtx)."""
    from ..engines.build import BuildOptions, build_engines, make_profile, stage_graphs
    from ..export.bundle import load_bundle
    from ..plugins.aot import parse_archs

    flavor = trt_compat.check_flavor(flavor or trt_compat.default_flavor())
    stage_graphs(stage)
    bundle = load_bundle(bundle_dir)
    opts = BuildOptions(flavor=flavor, stage=stage, fp16=fp16, int8=int8, archs=parse_archs(arch) if arch else None,
                        profile=make_profile(bundle.config.S, min_shape, opt_shape, max_shape), out_dir=out,
                        timing_cache=timing_cache, overwrite=overwrite)
    return BuildResult(flavor, build_engines(bundle, opts, progress=progress))
