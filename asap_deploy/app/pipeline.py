"""`asap export CHECKPOINT -o BUNDLE --engine rtx|tensorrt`: checkpoint -> ONNX bundle -> TensorRT
engine(s) -> validation, in one command (the use case; the work is done by export/bundle.py
export_checkpoint, engines/build.py build_engines and app/validate.py run_validate).

Every argument and every dependency is checked before any work: the flavour, the stage, the
target architectures (TensorRT-RTX: the ones it can target; full TensorRT: the GPU it runs on),
PyTorch, TensorRT / TensorRT-RTX, Triton (the plugin's kernels are compiled ahead of time), ONNX
Runtime, and the validation report folder. Then the bundle is exported, the engines are built
next to it with build-engine's defaults (profile 1xSxS .. 4x2048x2048, opt 1x1024x1024), and ONNX
Runtime is validated against the PyTorch fp32 reference at the engine's precision; the TensorRT
engines are validated too where this machine can run them (a GPU of a targeted architecture, and
all three graphs built). A TensorRT-RTX engine built on a CPU-only machine cannot run here: the
result says so and names the machines it can run on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import MissingDependencyError, UsageError
from .validate import default_report_dir

ENGINE_OPTIONS = ("--arch", "--stage")  # the options that mean something only with --engine
PLUGIN_EXTRA = {"rtx": "rtx", "tensorrt": "tensorrt"}


@dataclass(frozen=True)
class EngineRequest:
    """What `--engine` asks for, checked (flavour, stage, architectures)."""

    flavor: str  # rtx | tensorrt
    fp16: bool = False
    stage: str = "all"
    archs: tuple[int, ...] | None = None  # None: build.py's default (rtx: RTX_ARCHS; tensorrt: this GPU)

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def options(self) -> str:
        """The command-line options that ask for this request."""
        return (f"--engine {self.flavor}{' --fp16' if self.fp16 else ''}"
                f"{' --arch ' + ','.join(f'sm_{a}' for a in self.archs) if self.archs else ''}"
                f"{' --stage ' + self.stage if self.stage != 'all' else ''}")


@dataclass
class PipelineResult:
    export: Any  # export/bundle.py ExportResult
    engines: list  # engines/build.py BuiltEngine
    targets: dict[str, Any]
    validation: Any  # engines/validate.py ValidationReport
    validated: list[str]  # the backends compared with the reference
    samples: int
    engine_runnable: bool
    engine_note: str  # whether the engines were validated here, and if not, why and where they run
    next_commands: list[str] = field(default_factory=list)
    request: EngineRequest | None = None

    @property
    def passed(self) -> bool:
        return bool(self.validation.passed)


def engine_request(engine: str | None, *, fp16: bool = False, arch: str | None = None,
                   stage: str | None = None) -> EngineRequest | None:
    """The checked `--engine` request, or None without --engine (then --arch / --stage are refused:
    they would be ignored)."""
    from ..engines.build import stage_graphs
    from ..plugins import trt_compat
    from ..plugins.aot import parse_archs

    if engine is None:
        given = [o for o, v in zip(ENGINE_OPTIONS, (arch, stage)) if v is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} set(s) the TensorRT engine's build: give --engine rtx or "
                             f"--engine tensorrt with it (e.g. asap export CHECKPOINT -o BUNDLE --engine rtx "
                             f"{given[0]} {arch if given[0] == '--arch' else stage})")
        return None
    try:
        flavor = trt_compat.check_flavor(engine.strip().lower())
    except UsageError:
        from ..errors import did_you_mean

        raise UsageError(f"--engine {engine!r}: not a TensorRT flavour{did_you_mean(engine, trt_compat.FLAVORS)} "
                         f"(choose from: rtx (TensorRT-RTX, builds without a GPU), tensorrt (full TensorRT, on "
                         f"the GPU it targets))") from None
    stage = stage or "all"
    stage_graphs(stage)
    archs = tuple(parse_archs(arch)) if arch is not None else None
    return EngineRequest(flavor, fp16, stage, archs)


def check_prerequisites(req: EngineRequest, *, fp16_export: bool = True) -> dict[str, Any]:
    """MissingDependencyError (exit 6) naming the extra that installs what the pipeline needs, or
    UsageError for targets the flavour cannot build; the build's targets otherwise. Nothing is
    written (the TensorRT-RTX parser library link aside, which a build makes anyway)."""
    from ..engines.build import PLUGIN_GRAPHS, check_targets, stage_graphs
    from ..engines.machine import importable
    from ..errors import require_torch
    from ..plugins import trt_compat

    require_torch("asap export")
    if fp16_export and not importable("onnxconverter_common"):
        raise MissingDependencyError("fp16 export needs onnxconverter-common: pip install 'asap-deploy[torch]' "
                                     "(or pass --no-fp16 for an fp32 bundle and engine)")
    if not importable("onnxruntime"):
        raise MissingDependencyError("validating the bundle needs onnxruntime: pip install onnxruntime")
    extra = PLUGIN_EXTRA[req.flavor]
    targets = check_targets(req.flavor, req.archs)  # TrtUnavailable: pip install 'asap-deploy[rtx|tensorrt]'
    if any(g in PLUGIN_GRAPHS for g in stage_graphs(req.stage)) and not importable("triton"):
        raise MissingDependencyError(f"building the {req.stage} engine(s) needs Triton, which is not installed (the "
                                     f"SpatialMLP plugin carries its kernel compiled ahead of time): pip install "
                                     f"'asap-deploy[{extra}]'")
    if req.flavor == "rtx":
        trt_compat.ensure_rtx_parser_lib()  # RtxLibraryPathError: restart before any work, not after the export
    return targets


def engine_runnable_here(req: EngineRequest, targets: dict[str, Any]) -> tuple[bool, str]:
    """(the built engines can run on this machine, why not / where they run)."""
    from ..engines.build import STAGES
    from ..engines.registry import tensorrt_runtime

    sms = ", ".join(f"sm_{s}" for s in targets.get("sm", []))
    ok, why = tensorrt_runtime()
    if not ok:
        why = why.split(" (", 1)[0]  # "no CUDA driver", "no CUDA device", ...
        return False, (f"built but not run here: this machine cannot run a TensorRT engine ({why}); it runs on a "
                       f"GPU of {sms}")
    from ..plugins.cuda_driver import device_sm

    cc, name = device_sm(0)
    if cc not in targets.get("sm", []):
        return False, f"built but not run here: this GPU ({name}) is sm_{cc}, the engine targets {sms}"
    if req.stage != "all" and len(STAGES[req.stage]) < len(STAGES["all"]):
        return False, (f"built for this GPU ({name}, sm_{cc}); validation compares each stage, so it needs "
                       f"--stage all (the {req.stage} engine alone runs with asap infer)")
    return True, f"built for and validated on this GPU ({name}, sm_{cc})"


def next_commands(bundle: Path, req: EngineRequest, runnable: bool, targets: dict[str, Any]) -> list[str]:
    """What to run next: infer on the engine (on a machine it runs on) and bench."""
    from ..plugins import trt_compat

    prec = " --precision fp16" if req.fp16 else ""
    env = "" if trt_compat.default_flavor() == req.flavor else f"ASAP_TRT_FLAVOR={req.flavor} "
    cmds = [f"{env}asap infer LABEL_MAPS --bundle {bundle} --backend tensorrt{prec} -o OUT"]
    if not runnable:
        cmds[0] += f"   # on a GPU of {', '.join(f'sm_{s}' for s in targets.get('sm', []))}"
        cmds.append(f"asap infer LABEL_MAPS --bundle {bundle} --backend onnxruntime{prec} -o OUT   # here")
    cmds.append(f"{env}asap bench --bundle {bundle}{prec}")
    return cmds


def export_and_build(checkpoint: str | os.PathLike, out: str | os.PathLike, req: EngineRequest, *, config=None,
                     fp16_export: bool = True, overwrite: bool = False, random: int = 4, seed: int = 0,
                     kernel_cache: Path | None = None, progress: Callable[[str], None] | None = None
                     ) -> PipelineResult:
    """Check everything, then export -> build -> validate. Validation failures are in the result
    (`passed`), not raised: the bundle and engines are written either way."""
    from ..engines.build import BuildOptions, build_engines
    from ..engines.validate import MAX_LABEL_MAPS, check_report_dir
    from ..export.bundle import MANIFEST, export_checkpoint, load_bundle
    from ..limits import check_range, check_seed

    checkpoint, out = Path(checkpoint), Path(out)
    check_range("--random", random, 1, MAX_LABEL_MAPS)
    check_seed("--seed", seed)
    if (checkpoint / MANIFEST).is_file():
        raise UsageError(f"{checkpoint} is already a bundle: build its engine with asap build-engine {checkpoint} "
                         f"--flavor {req.flavor}{' --fp16' if req.fp16 else ''}")
    if req.fp16 and not fp16_export:
        raise UsageError("an fp16 engine is built from the bundle's fp16 graphs: drop --no-fp16")
    report_dir = default_report_dir(out)
    check_report_dir(report_dir, [checkpoint])
    targets = check_prerequisites(req, fp16_export=fp16_export)

    exported = export_checkpoint(checkpoint, out, config=config, fp16=fp16_export, overwrite=overwrite,
                                 progress=progress)
    bundle = load_bundle(exported.path)
    built = build_engines(bundle, BuildOptions(flavor=req.flavor, stage=req.stage, fp16=req.fp16,
                                               archs=list(req.archs) if req.archs else None,
                                               kernel_cache=kernel_cache, overwrite=overwrite), progress)
    runnable, note = engine_runnable_here(req, targets)
    backends: Sequence[str] = ("onnxruntime", "tensorrt") if runnable else ("onnxruntime",)
    from .validate import run_validate

    rep, names, n = run_validate(exported.path, backends, random=random, precision=req.precision, report=report_dir,
                                 seed=seed, progress=progress, engine_options={"tensorrt": {"flavor": req.flavor}})
    return PipelineResult(exported, built, targets, rep, list(names), n, runnable, note,
                          next_commands(exported.path, req, runnable, targets), req)


def export_only(checkpoint: str | os.PathLike, out: str | os.PathLike, *, config=None, fp16: bool = True,
                overwrite: bool = False, progress: Callable[[str], None] | None = None):
    """`asap export` without --engine: the ONNX bundle (+ fp16 graphs unless fp16=False)."""
    from ..export.bundle import export_checkpoint

    return export_checkpoint(checkpoint, out, config=config, preset=None, fp16=fp16, overwrite=overwrite,
                             progress=progress)


def checkpoint_for_bundle(path: Path, *, flavor: str | None = None, fp16: bool = False, arch: str | None = None,
                          stage: str = "all") -> None:
    """`asap build-engine CHECKPOINT`: a file where a bundle folder is expected. UsageError naming
    the one command that exports and builds it (nothing when `path` is not a file)."""
    from ..export.bundle import MANIFEST
    from ..io import derived_name

    path = Path(path)
    if path.is_dir() or not os.path.lexists(path):
        return
    if path.name == MANIFEST:
        raise UsageError(f"{path} is a bundle's manifest: pass its folder: asap build-engine {path.parent}")
    bundle = path.with_name(derived_name(path.stem, "-bundle"))
    cmd = (f"asap export {path} -o {bundle} --engine {flavor or 'rtx'}{' --fp16' if fp16 else ''}"
           f"{' --arch ' + arch if arch else ''}{' --stage ' + stage if stage != 'all' else ''}")
    raise UsageError(f"{path} is a file (a checkpoint?), not a bundle folder written by asap export. Export, build "
                     f"and validate in one go with: {cmd}")
