"""The one table of backends: name, the Engine it opens (and with which ONNX Runtime providers),
availability here with the reason, precisions, stages, whether it renders `--scale`, and how to
open it. Every command reads it: `auto` (choose_backend), infer/serve (open_engine), validate
(check_backend/create_engine), bench (bench_backends), doctor (ort_providers).

    name              engine        providers   precisions        --scale  GPU            auto tries it
    torch             torch         -           fp32              yes      where present  6th
    onnxruntime       onnxruntime   CPU         fp32, fp16, int8  yes      no             4th (int8: 5th)
    onnxruntime-cuda  onnxruntime   CUDA, CPU   fp32, fp16, int8  yes      yes            3rd
    tensorrt          tensorrt      -           fp32, fp16        no       yes            1st (fastest)
    openvino          openvino      -           fp32, bf16, int8  yes      no             5th (int8: 4th)
    torch-cuda        torch-cuda    -           fp32, fp16        no       yes            2nd

`auto` tries only the backends whose row lists the precision asked for (bf16: openvino alone), by
auto_rank. A backend whose name is its engine's is one a user names with --backend (infer, serve,
validate); onnxruntime-cuda is a variant that `auto` picks and bench measures. Nothing here imports
a runtime at import time: availability checks import lazily and never raise.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from asap_deploy.errors import AsapError, InputError, MissingDependencyError, UsageError, did_you_mean
from asap_deploy.export.stages import Stage

from .engine_file import EngineFile, engine_glob

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


# ---- availability (module functions: tests stand in for the machine by replacing them) ------------
def _torch_ok() -> tuple[bool, str]:
    from .machine import importable

    ok = importable("torch")
    return ok, "" if ok else "PyTorch is not installed (pip install 'asap-deploy[torch]')"


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def ort_providers() -> list[str]:
    """ONNX Runtime's execution providers here (empty without onnxruntime)."""
    return _ort_providers()


def tensorrt_runtime() -> tuple[bool, str]:
    """Whether TensorRT (or TensorRT-RTX) and a GPU are here (never raises)."""
    if not any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx")):
        return False, "neither tensorrt nor tensorrt_rtx is installed"
    from asap_deploy.plugins.cuda_driver import cuda_device_count

    n, why = cuda_device_count()
    if n == 0:
        return False, why
    return True, "GPU present"


def tensorrt_usable(bundle_dir: Path, precision: str) -> tuple[bool, str]:
    """Whether engines for `bundle_dir` exist and TensorRT + a GPU are here (never raises)."""
    engines = sorted(Path(bundle_dir).glob(engine_glob(precision)))
    if not engines:
        return False, f"no {precision} engine in {bundle_dir} (build one with: asap build-engine {bundle_dir})"
    ok, why = tensorrt_runtime()
    if not ok:
        return False, why
    return True, f"{len(engines)} engine(s) in {bundle_dir}, GPU present"


def _openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@functools.lru_cache(maxsize=1)
def _openvino_capabilities() -> tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU (BF16, INT8, FP32, ...); empty where
    openvino does not load."""
    from .openvino_engine import cpu_capabilities

    try:
        return tuple(cpu_capabilities())
    except (ImportError, OSError, RuntimeError, AsapError):
        return ()


def openvino_capabilities() -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU (empty without openvino; never raises)."""
    return list(_openvino_capabilities()) if _openvino_installed() else []


def bundle_holds(bundle_dir: Path, precision: str) -> tuple[bool, str]:
    """Whether the bundle in `bundle_dir` holds the graph files `precision` reads (its manifest,
    read without hashing the files; never raises)."""
    from asap_deploy.export.bundle import load_bundle
    from asap_deploy.precisions import QUANTIZED, graph_precision

    files = graph_precision(precision)
    try:
        held = load_bundle(bundle_dir, verify=False).precisions
    except AsapError as exc:
        return False, exc.message
    if files in held:
        return True, f"{files} graphs in {bundle_dir}"
    hint = f"; write them with: asap quantize {bundle_dir} --calib MAPS" if files == QUANTIZED else ""
    return False, f"no {files} graphs in {bundle_dir} (it holds {', '.join(held)}){hint}"


def _check_openvino(bundle_dir: Path | None, precision: str) -> tuple[bool, str]:
    """openvino installed; bf16: the CPU has bf16 units; int8: the bundle (when given) holds int8 graphs."""
    if precision not in OPENVINO.precisions:
        return False, f"runs {', '.join(OPENVINO.precisions)}, not {precision}"
    if not _openvino_installed():
        return False, "not installed (pip install 'asap-deploy[openvino]')"
    why = "openvino installed"
    if precision == "bf16":
        from .openvino_engine import bf16_support

        ok, why = bf16_support(list(_openvino_capabilities()))
        if not ok:
            return False, why
    if bundle_dir is not None:
        ok, held = bundle_holds(bundle_dir, precision)
        if not ok:
            return False, held
        if precision != "bf16":
            why = held
    return True, why


def _check_torch(bundle_dir: Path | None, precision: str) -> tuple[bool, str]:
    return _torch_ok()


def torch_cuda_runtime() -> tuple[bool, str]:
    """Whether PyTorch with CUDA, a device and Triton are here (never raises)."""
    from .torch_cuda import torch_cuda_runtime as runtime

    return runtime()


def _check_torch_cuda(bundle_dir: Path | None, precision: str) -> tuple[bool, str]:
    return torch_cuda_runtime()


def _ort_int8(bundle_dir: Path | None, precision: str, ok: bool, why: str) -> tuple[bool, str]:
    """int8 runs the bundle's int8 graphs (asap quantize): usable only where the bundle holds them."""
    if ok and precision == "int8" and bundle_dir is not None:
        return bundle_holds(bundle_dir, precision)
    return ok, why


def _check_ort(bundle_dir: Path | None, precision: str) -> tuple[bool, str]:
    ok = CPU_PROVIDER in _ort_providers()
    return _ort_int8(bundle_dir, precision, ok, f"{CPU_PROVIDER} available" if ok else "not installed")


def _check_ort_cuda(bundle_dir: Path | None, precision: str) -> tuple[bool, str]:
    ok = CUDA_PROVIDER in _ort_providers()
    return _ort_int8(bundle_dir, precision, ok, f"{CUDA_PROVIDER} available" if ok
                     else f"{CUDA_PROVIDER} not available (pip install onnxruntime-gpu)")


def _check_tensorrt(bundle_dir: Path | None, precision: str) -> tuple[bool, str]:
    """With a bundle: its engines too; without (doctor), only the runtime and the GPU."""
    return tensorrt_usable(bundle_dir, precision) if bundle_dir is not None else tensorrt_runtime()


# ---- opening ---------------------------------------------------------------------------------------
def _open_torch(backend: "Backend", bundle, precision: str, **options):
    if precision != "fp32":
        raise UsageError(f"the torch backend is the fp32 reference; precision {precision!r} is not available for it")
    from .torch_engine import TorchEngine

    return TorchEngine.from_bundle(bundle, **options)


def _open_torch_cuda(backend: "Backend", bundle, precision: str, **options):
    from .torch_cuda import TorchCudaEngine  # PyTorch on a CUDA GPU: fused kernel, CUDA graphs

    return TorchCudaEngine.from_bundle(bundle, precision, **options)


def _open_ort(backend: "Backend", bundle, precision: str, **options):
    from .onnxruntime_engine import OnnxRuntimeEngine

    options.setdefault("providers", list(backend.providers))
    return OnnxRuntimeEngine(bundle, precision, **options)


def _open_openvino(backend: "Backend", bundle, precision: str, **options):
    from .openvino_engine import OpenVinoEngine

    return OpenVinoEngine(bundle, precision, **options)


def _open_tensorrt(backend: "Backend", bundle, precision: str, **options):
    from .tensorrt import TensorRTEngine  # engines built by `asap build-engine`; needs a GPU

    return TensorRTEngine(bundle, precision, **options)


@dataclass(frozen=True)
class Backend:
    name: str  # --backend value, Choice.backend, bench row
    engine: str  # the Engine it opens (Engine.name)
    label: str  # how `auto` names it in what it skipped
    providers: tuple[str, ...]  # ONNX Runtime providers of this variant (empty: not ONNX Runtime)
    precisions: tuple[str, ...]
    scale: bool  # renders `asap infer --scale` (Engine.scaled_mlp)
    auto_rank: int  # `auto` tries lower ranks first: fastest first
    auto_reason: str  # what `auto` says when it picks it; {why}: the availability reason
    check: Callable[[Path | None, str], tuple[bool, str]] = field(repr=False)
    opener: Callable[..., object] = field(repr=False)
    stages: tuple[Stage, ...] = tuple(Stage)
    gpu: bool | None = False  # runs on a GPU: always, never, or (None) where one is here

    @property
    def selectable(self) -> bool:
        """Named by --backend (a variant such as onnxruntime-cuda is picked by auto or measured by bench)."""
        return self.name == self.engine

    def available(self, bundle_dir: Path | None = None, precision: str = "fp32") -> tuple[bool, str]:
        """(usable here, why): for `bundle_dir` at `precision` when given (TensorRT needs its engines)."""
        return self.check(bundle_dir, precision)

    def open(self, bundle, precision: str = "fp32", **options):
        """An Engine of this backend running `bundle` at `precision`."""
        return self.opener(self, bundle, precision, **options)


# Listing order (help texts, error messages, bench's table); `auto` goes by auto_rank.
BACKENDS: tuple[Backend, ...] = (
    Backend("torch", "torch", "torch", (), ("fp32",), True, 50, "PyTorch (no ONNX Runtime here)",
            _check_torch, _open_torch, gpu=None),
    Backend("onnxruntime", "onnxruntime", "onnxruntime", (CPU_PROVIDER,), ("fp32", "fp16", "int8"), True, 30,
            "ONNX Runtime on the CPU (no TensorRT engine / GPU here)", _check_ort, _open_ort),
    Backend("onnxruntime-cuda", "onnxruntime", "onnxruntime CUDA", (CUDA_PROVIDER, CPU_PROVIDER), ("fp32", "fp16", "int8"),
            True, 20, "ONNX Runtime with the CUDA provider is available", _check_ort_cuda, _open_ort, gpu=True),
    Backend("tensorrt", "tensorrt", "tensorrt", (), ("fp32", "fp16"), False, 10, "TensorRT is fastest and usable: {why}",
            _check_tensorrt, _open_tensorrt, gpu=True),
    # OpenVINO after ONNX Runtime in fp32, before it in int8 (AUTO_RANK_BY_PRECISION): `asap bench
    # --precision all` on a trained facades-preset bundle at 1024x1024, 2-core Xeon (AVX-512, VNNI,
    # avx512_bf16, no AMX), load 1.1-1.4, medians end to end: fp32 ONNX Runtime 606 ms, OpenVINO
    # 550 ms (an earlier quiet run: 563 vs 586 ms, so no clear winner: ONNX Runtime, the base
    # install, stays first); int8 ONNX Runtime 593 ms, OpenVINO 512 ms (OpenVINO's int8 predictor
    # 126 ms vs 166 ms). bf16 550 -> 739 ms: slower than fp32 without AMX. The only bf16 backend.
    Backend("openvino", "openvino", "openvino", (), ("fp32", "bf16", "int8"), True, 40,
            "OpenVINO on the CPU: {why}", _check_openvino, _open_openvino),
    # torch-cuda after TensorRT and before ONNX Runtime CUDA, reasoned, not measured (no GPU has run
    # either yet): it runs the pixelwise stage as ONE fused kernel with no full-resolution tensor,
    # where ONNX Runtime CUDA runs the SpatialMLP node's standard-op body (full-resolution one-hot,
    # encoding and per-layer activations in memory), and it replays each call as one CUDA graph;
    # TensorRT does the same with the plugin plus fused convolutions and no Python per call.
    Backend("torch-cuda", "torch-cuda", "torch CUDA", (), ("fp32", "fp16"), False, 15,
            "PyTorch on the GPU (fused kernel, CUDA graphs): {why}", _check_torch_cuda, _open_torch_cuda, gpu=True),
)
BY_NAME = {b.name: b for b in BACKENDS}
NAMES = tuple(BY_NAME)
ENGINE_NAMES = tuple(b.name for b in BACKENDS if b.selectable)  # torch, onnxruntime, tensorrt, openvino, torch-cuda


# Ranks that differ at one precision (measured: the openvino row's comment): in int8 OpenVINO runs
# the quantized predictor faster than ONNX Runtime on the CPU.
AUTO_RANK_BY_PRECISION: dict[str, dict[str, int]] = {"int8": {"openvino": 25}}


def auto_order(precision: str = "fp32") -> tuple[Backend, ...]:
    """Every backend in the order `auto` tries them at `precision` (fastest first; `auto` skips the
    backends whose row does not list the precision)."""
    ranks = AUTO_RANK_BY_PRECISION.get(precision, {})
    return tuple(sorted(BACKENDS, key=lambda b: ranks.get(b.name, b.auto_rank)))


AUTO_ORDER = auto_order()  # at fp32
AUTO = "auto"
CHOICES = (AUTO, *ENGINE_NAMES)  # --backend of infer and serve
SCALE_ENGINES = tuple(b.name for b in BACKENDS if b.scale and b.selectable)
TORCH, ONNXRUNTIME, TENSORRT, OPENVINO = BY_NAME["torch"], BY_NAME["onnxruntime"], BY_NAME["tensorrt"], BY_NAME["openvino"]
TORCH_CUDA = BY_NAME["torch-cuda"]


def backend(name: str) -> Backend:
    """The registry entry of `name` (any name, variants included); UsageError suggesting the nearest."""
    if name in BY_NAME:
        return BY_NAME[name]
    raise UsageError(f"unknown backend {name!r}{did_you_mean(name, NAMES)} (choose from: {', '.join(NAMES)})")


def check_backend(name: str) -> str:
    """Reject an unknown backend name, suggesting the nearest valid one (never running a guess)."""
    if name in ENGINE_NAMES:
        return name
    raise UsageError(f"unknown backend {name!r}{did_you_mean(name, ENGINE_NAMES)} "
                     f"(choose from: {', '.join(ENGINE_NAMES)})")


def create_engine(name: str, bundle, precision: str = "fp32", **options):
    """An Engine of backend `name` running `bundle` at `precision`."""
    return BY_NAME[check_backend(name)].open(bundle, precision, **options)


def _and(names) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def scale_backends_text() -> str:
    """'the torch, onnxruntime and openvino backends': the backends that render --scale."""
    return f"the {_and(SCALE_ENGINES)} backends"


def check_scale_capable(engine_name: str) -> None:
    """UsageError unless an Engine of this name renders --scale."""
    b = BY_NAME.get(engine_name)
    if b is None or not b.scale:
        raise UsageError(f"--scale runs on {scale_backends_text()}, not {engine_name} "
                         f"(pass {' or '.join(f'--backend {n}' for n in reversed(SCALE_ENGINES))})")


def usable_backends(bundle_dir: Path | None = None, precision: str = "fp32") -> list[str]:
    """The backends usable here (for `bundle_dir` at `precision` when given), in listing order."""
    return [b.name for b in BACKENDS if b.available(bundle_dir, precision)[0]]


# ---- the choice ------------------------------------------------------------------------------------
@dataclass
class Source:
    """Where the model comes from: exactly one of a checkpoint, a bundle, an engine file."""

    model: Path | None = None
    bundle: Path | None = None
    engine: Path | None = None

    def check(self) -> None:
        given = [n for n in ("model", "bundle", "engine") if getattr(self, n) is not None]
        if len(given) != 1:
            raise UsageError("give exactly one of --model, --bundle, --engine" + (f" (got {', '.join('--' + g for g in given)})"
                                                                                    if given else ""))


@dataclass
class Choice:
    backend: str
    reason: str
    skipped: list[str] = field(default_factory=list)


def choose_backend(requested: str, source: Source, precision: str = "fp32", scale: float | None = None) -> Choice:
    """auto: the registry's backends that run `precision`, by auto_rank (TensorRT > torch-cuda >
    ONNX Runtime CUDA > ONNX Runtime CPU > OpenVINO > torch; bf16: OpenVINO alone), the first usable
    one, with the reason and what was skipped and why."""
    if requested not in CHOICES:
        raise UsageError(f"unknown backend {requested!r}{did_you_mean(requested, CHOICES)} "
                         f"(choose from: {', '.join(CHOICES)})")
    source.check()
    scaled = scale is not None and scale != 1
    torch, trt = TORCH.name, TENSORRT.name
    if source.model is not None:
        if requested not in (AUTO, torch, TORCH_CUDA.name):
            raise UsageError(f"--model runs on the {torch} (or {TORCH_CUDA.name}) backend only; for {requested} "
                             f"export a bundle first (asap export {source.model} -o BUNDLE) and pass --bundle")
        chosen = TORCH_CUDA if requested == TORCH_CUDA.name else TORCH
        ok, why = chosen.available(None, precision)
        if not ok:
            raise MissingDependencyError(f"--model needs the {chosen.name} backend: {why}")
        return Choice(chosen.name, f"a checkpoint (--model) runs on the PyTorch backend ({chosen.name})")
    if source.engine is not None:
        if requested not in (AUTO, trt):
            raise UsageError(f"--engine runs on the {trt} backend; for {requested} pass --bundle "
                             f"{source.engine.parent}")
        if scaled:
            raise UsageError(f"--scale runs on {scale_backends_text()}: pass --bundle "
                             f"{source.engine.parent} instead of --engine")
        return Choice(trt, f"--engine {source.engine.name}")
    if requested != AUTO:
        if scaled and not BY_NAME[requested].scale:
            raise UsageError(f"--scale runs on {scale_backends_text()}, not {requested}")
        if precision not in BY_NAME[requested].precisions:
            able = [b.name for b in BACKENDS if b.selectable and precision in b.precisions]
            raise UsageError(f"--precision {precision}: the {requested} backend runs "
                             f"{', '.join(BY_NAME[requested].precisions)}"
                             + (f"; {precision} runs on {_and(able)}" if able else ""))
        return Choice(requested, "--backend " + requested)
    skipped = []
    for b in auto_order(precision):
        if precision not in b.precisions:
            skipped.append(f"{b.label}: runs {', '.join(b.precisions)}, not {precision}")
            continue
        if scaled and not b.scale:
            skipped.append(f"{b.label}: --scale runs on {'/'.join(SCALE_ENGINES)} only")
            continue
        ok, why = b.available(source.bundle, precision)
        if ok:
            return Choice(b.name, b.auto_reason.format(why=why), skipped)
        skipped.append(f"{b.label}: {why}")
    raise UsageError("no backend can run this bundle: " + "; ".join(skipped))


def open_engine(choice: Choice, source: Source, precision: str = "fp32", cpu_threads: int | None = None):
    """(Engine, bundle or None) for a Choice. `cpu_threads` caps the CPU threads of a torch, ONNX
    Runtime or OpenVINO engine (a process sharing the machine with others, e.g. one of several Ray
    actors)."""
    from asap_deploy.export.bundle import load_bundle

    b = backend(choice.backend)
    if cpu_threads and (source.model is not None or b.engine == TORCH.engine):
        import torch

        torch.set_num_threads(cpu_threads)
    if source.model is not None:
        if b is TORCH_CUDA:
            from .torch_cuda import TorchCudaEngine

            return TorchCudaEngine.from_checkpoint(source.model, precision=precision), None
        from .torch_engine import TorchEngine

        return TorchEngine.from_checkpoint(source.model), None
    if source.engine is not None:
        eng_path = Path(source.engine)
        if not eng_path.is_file():
            raise InputError(f"{eng_path}: no such engine file")
        ef = EngineFile.parse(eng_path)
        bundle = load_bundle(eng_path.parent)
        return TENSORRT.open(bundle, ef.precision, flavor=ef.flavor, graphs=ef.graphs), bundle
    bundle = load_bundle(source.bundle)
    if b.providers or b.gpu is False:  # ONNX Runtime and the CPU backends take intra_op_threads
        return b.open(bundle, precision, intra_op_threads=cpu_threads), bundle
    return b.open(bundle, precision), bundle
