"""Build TensorRT / TensorRT-RTX engines from a bundle (`asap build-engine`), and the sidecar
that says what an engine was built from and for.

One engine per graph (predictor, pixelwise, asap = end-to-end): the bundle's ONNX is parsed with
the ONNX parser (the `asap::SpatialMLP` node becomes our plugin, plugins/tensorrt.py, carrying the
AOT-compiled kernels for the target architectures), with one optimization profile over batch/H/W,
a persistent timing cache in the bundle folder, and the engine written atomically next to a JSON
sidecar (`<engine>.json`). `check_sidecar` (used by engines/tensorrt.py before deserializing)
refuses an engine whose sidecar does not match the installed TensorRT, the GPU, the plugin
version or the bundle's ONNX, saying what to rebuild.

fp16: TensorRT 11 and TensorRT-RTX are strongly typed only: the engine is built from the bundle's
`*.fp16.onnx` as is. TensorRT 10.x does the same when the bundle has fp16 graphs, and falls back
to the FP16 builder flag on the fp32 graph (weakly typed) when it has not; the sidecar records
which (`fp16_method`).

int8 (`--int8`): built from the bundle's `*.int8.onnx` (written by `asap quantize`) as is, strongly
typed: the QDQ nodes say what runs in int8. TensorRT quantizes symmetrically to int8 only, so the
graphs must come from `asap quantize --activations int8` (every zero point 0, int8, biases fp32);
ONNX Runtime's default recipe (uint8 asymmetric activations) and NNCF's graphs are refused before
the parser sees them (`tensorrt_qdq_problems`), naming the node and the fix. The
SpatialMLP node stays the plugin in fp32 (the parser maps the node, not its function).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from asap_deploy.config import padded_size
from asap_deploy.errors import EngineError, KernelError, OutputError, UsageError
from asap_deploy.export.stages import GRAPHS, Stage
from asap_deploy.io import (atomic_path, check_file_replaceable, check_not_input, check_replaceable, claim_files,
                            owns_file, read_regular_file, staged_dir, write_json)

from .engine_file import engine_name  # noqa: F401 - the format and its parser: engine_file.py

SIDECAR_SCHEMA = "asap-deploy/engine"
SIDECAR_VERSION = 1
# --stage value -> graphs (export/stages.py spells each stage)
STAGES = {**{s.cli: (s.graph,) for s in Stage}, "all": tuple(s.graph for s in Stage)}
PLUGIN_GRAPHS = (Stage.PIXELWISE.graph, Stage.END_TO_END.graph)
RTX_ARCHS = (75, 80, 86, 89, 120)  # what TensorRT-RTX 1.7 targets (no sm_90: not for H100/H200)
DEFAULT_OPT = (1, 1024, 1024)
DEFAULT_MAX = (4, 2048, 2048)
CACHE_FORMAT = 2  # part of every kernel-cache key: entries of an older layout are never read
MAX_TIMING_CACHE_BYTES = 1 << 30


# ---- shapes and profiles ------------------------------------------------------------------------
def parse_shape(text: str, what: str = "shape") -> tuple[int, int, int]:
    """'1x1024x1024' (N x H x W; also 'HxW' with N = 1) -> (N, H, W); UsageError otherwise."""
    parts = [p for p in re.split(r"[x,X*]", str(text).strip()) if p]
    if len(parts) == 2:
        parts = ["1", *parts]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"bad {what} {text!r}: write it as NxHxW with positive integers, e.g. 1x1024x1024")
    n, h, w = (int(p) for p in parts)
    return n, h, w


@dataclass(frozen=True)
class Profile:
    """Batch/height/width range of the label maps; the parameter grid follows (H/S, W/S)."""

    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    def check(self, S: int) -> "Profile":  # noqa: N803
        for name in ("min", "opt", "max"):
            n, h, w = getattr(self, name)
            ph, pw = padded_size(h, w, S)
            if (ph, pw) != (h, w):
                raise UsageError(f"--{name} {n}x{h}x{w}: H and W must be multiples of S={S} (e.g. {n}x{ph}x{pw})")
        for i, axis in enumerate("NHW"):
            if not self.min[i] <= self.opt[i] <= self.max[i]:
                raise UsageError(f"profile {axis}: need min <= opt <= max, got {self.min[i]}, {self.opt[i]}, "
                                 f"{self.max[i]}")
        return self

    def for_input(self, name: str, S: int, num_params: int) -> dict[str, list[int]]:  # noqa: N803
        if name == "params":
            return {k: [v[0], num_params, v[1] // S, v[2] // S] for k, v in asdict(self).items()}
        return {k: list(v) for k, v in asdict(self).items()}

    def to_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}


def default_profile(S: int) -> Profile:  # noqa: N803
    """opt 1x1024x1024, min 1xSxS, max 4x2048x2048, rounded up to multiples of S."""
    return Profile((1, S, S), (DEFAULT_OPT[0], *padded_size(*DEFAULT_OPT[1:], S)),
                   (DEFAULT_MAX[0], *padded_size(*DEFAULT_MAX[1:], S)))


def make_profile(S: int, min_shape: str | None = None, opt_shape: str | None = None,  # noqa: N803
                 max_shape: str | None = None) -> Profile:
    d = default_profile(S)
    return Profile(parse_shape(min_shape, "--min") if min_shape else d.min,
                   parse_shape(opt_shape, "--opt") if opt_shape else d.opt,
                   parse_shape(max_shape, "--max") if max_shape else d.max).check(S)


def stage_graphs(stage: str) -> tuple[str, ...]:
    if stage not in STAGES:
        from asap_deploy.errors import did_you_mean

        raise UsageError(f"unknown stage {stage!r}{did_you_mean(stage, STAGES)} (choose from: {', '.join(STAGES)})")
    return STAGES[stage]


# ---- kernels for the plugin (AOT, cached) ---------------------------------------------------------
def kernel_cache_dir() -> Path:
    env = os.environ.get("ASAP_KERNEL_CACHE")
    if env:
        return Path(env)
    from asap_deploy.io import cache_root

    return cache_root() / "kernels"


def plugin_kernels(cfg, archs: Sequence[int], dtype_pairs: Sequence[tuple[str, str]], cache_dir: Path | None = None,
                   progress: Callable[[str], None] | None = None):
    """KernelPack with the fused kernel for every arch x (params, out) dtype pair, compiled ahead of
    time (Triton, no GPU) or taken from the cache (key: variant, arch, Triton version, kernel source).

    A cache entry is a folder `<cache>/<key>/` written whole (a kernel folder of plugins/aot.py:
    index.json with the sha256 of every file, the metadata, cubin and PTX, and asap's ownership
    marker). It is used only if every file is a regular file inside it, matches the recorded sha256
    and was compiled for exactly this variant, architecture and Triton; otherwise it is recompiled
    and replaced, or, when the entry is not one asap wrote (a symbolic link, a special file, a
    folder of other files), refused with a KernelError naming it and the cause."""
    try:
        import triton
    except ImportError as exc:  # the [rtx] and [tensorrt] extras install it
        from asap_deploy.errors import MissingDependencyError

        raise MissingDependencyError("the asap TensorRT plugin's kernels are compiled with Triton, which is not "
                                     "installed: pip install 'asap-deploy[rtx]' (or 'asap-deploy[tensorrt]')") from exc

    from asap_deploy.plugins import aot
    from asap_deploy.plugins import kernel as kernel_mod
    from asap_deploy.plugins.plugin_core import KernelPack, PackedKernel
    from asap_deploy.plugins.spec import kernel_spec

    cache = Path(cache_dir) if cache_dir is not None else kernel_cache_dir()
    src = hashlib.sha256(Path(kernel_mod.__file__).read_bytes()).hexdigest()[:16]
    spec = kernel_spec(cfg)  # ConfigError naming the field the kernel cannot take
    kernels = []
    for cc in archs:
        for pd, od in dtype_pairs:
            v = aot.Variant(spec, pd, od)
            key = hashlib.sha256(f"v{CACHE_FORMAT}|{v.stem}|{cc}|{triton.__version__}|{src}".encode()).hexdigest()[:24]
            folder = cache / key
            try:
                found = _cached_kernel(folder, v, cc, triton.__version__)
                why = "not cached yet"
            except KernelError as exc:  # damaged, truncated, foreign or for another variant: recompiled
                found, why = None, exc.message
            if found is None:
                if progress:
                    progress(f"compiling the SpatialMLP kernel for sm_{cc} ({pd} -> {od}): {why}")
                found = _compile_into_cache(folder, v, cc, triton.__version__, why)
            kernels.append(PackedKernel(*found))
    return KernelPack(kernels)


def _cached_kernel(folder: Path, variant, cc: int, triton_version: str) -> tuple[dict, bytes, bytes] | None:
    """(metadata, cubin, ptx) of the cache entry `folder`, verified; None if there is none;
    KernelError naming the cause if it is there but unusable."""
    import stat

    from asap_deploy.plugins import aot

    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KernelError(f"{folder}: cannot read the kernel cache entry ({exc.strerror or exc})") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise KernelError(f"{folder}: the kernel cache entry is not a folder (a symbolic link or special file)")
    index = aot.load_index(folder)
    # the request, or the same kernel re-reading its weights when the request's shared memory does
    # not fit sm_<cc> (aot.fit_variant decides, the same way every time)
    names = {f"{v.stem}_sm{cc}.json": v for v in variant.candidates()}
    listed = [e.get("json") for e in index["kernels"]]
    if len(listed) != 1 or listed[0] not in names or not index["kernels"][0].get("sha256"):
        raise KernelError(f"{folder / aot.INDEX}: does not list exactly one of {', '.join(names)} with its sha256")
    meta, cubin, ptx = aot.load_kernel(folder, index["kernels"][0])
    aot.check_variant(meta, names[listed[0]], cc, triton_version, folder / listed[0])
    return meta, cubin, ptx


def _compile_into_cache(folder: Path, variant, cc: int, triton_version: str, why: str) -> tuple[dict, bytes, bytes]:
    """Compile `variant` for sm_<cc> into a new cache entry that replaces `folder` in one piece
    (only if `folder` is absent or an entry asap wrote); return it, read back and verified."""
    from asap_deploy.plugins import aot

    if os.path.lexists(folder):
        try:
            check_replaceable(folder, aot.KIND, "kernel cache entry")
        except OutputError as exc:
            raise KernelError(f"{folder}: the cached kernel cannot be used ({why}) and the entry is not one asap "
                              f"can replace ({exc.message}); remove it, or point ASAP_KERNEL_CACHE at another "
                              f"folder") from exc
    with staged_dir(folder, "kernel cache entry", kind=aot.KIND) as tmp:
        aot.compile_kernels([cc], tmp, [variant], repack_dtypes=[])
        found = _cached_kernel(tmp, variant, cc, triton_version)
    if found is None:  # pragma: no cover - the staged folder exists until the swap
        raise KernelError(f"{folder}: the compiled kernel vanished before it was read back")
    return found


# ---- the sidecar ----------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_path(engine_path: Path) -> Path:
    return Path(str(engine_path) + ".json")


MAX_SIDECAR_BYTES = 16 << 20  # a sidecar is a few kB


def read_sidecar(engine_path: Path) -> dict:
    """The sidecar of `engine_path`, checked for schema and field types (EngineError naming it
    otherwise). Untrusted: read only from a regular file of at most MAX_SIDECAR_BYTES (a FIFO or
    device is refused, never waited on)."""
    engine_path = Path(engine_path)
    p = sidecar_path(engine_path)
    if not os.path.lexists(p):
        raise EngineError(f"{p}: missing: {engine_path.name} has no sidecar; rebuild it with `asap build-engine`")
    raw = read_regular_file(p, "engine sidecar", MAX_SIDECAR_BYTES, error=EngineError)
    try:
        sc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EngineError(f"{p}: unreadable sidecar ({exc}); rebuild the engine with `asap build-engine`") from exc
    if not isinstance(sc, dict) or sc.get("schema") != SIDECAR_SCHEMA or sc.get("schema_version") != SIDECAR_VERSION:
        raise EngineError(f"{p}: not an asap-deploy engine sidecar of version {SIDECAR_VERSION}; "
                          f"rebuild the engine with `asap build-engine`")
    bad = [k for k in ("engine", "tensorrt", "targets", "source_onnx", "bundle", "profile") if not isinstance(sc.get(k), dict)]
    bad += [k for k in ("plugin",) if sc.get(k) is not None and not isinstance(sc.get(k), dict)]
    if bad or not isinstance(sc["targets"].get("sm", []), list):
        raise EngineError(f"{p}: malformed sidecar (field(s) {', '.join(bad) or 'targets.sm'} of the wrong type); "
                          "rebuild the engine with `asap build-engine`")
    if sc["engine"].get("file") != engine_path.name:
        raise EngineError(f"{p}: describes the engine {sc['engine'].get('file')!r}, not {engine_path.name} (a sidecar "
                          "copied from another engine?); rebuild the engine with `asap build-engine`")
    return sc


def rebuild_command(sc: dict) -> str:
    graph = sc.get("graph")
    stage = Stage.from_graph(graph).cli if graph in GRAPHS else graph
    bundle = sc.get("bundle", {}).get("path", "BUNDLE_DIR")
    fp16 = {"fp16": " --fp16", "int8": " --int8"}.get(sc.get("precision"), "")
    return (f"asap build-engine {bundle} --stage {stage} --flavor {sc.get('tensorrt', {}).get('flavor')}{fp16} "
            "--overwrite")


def sidecar_kernels(pack) -> list[dict]:
    """Per kernel the engine's plugin carries: what the runner checks against the GPU and its driver
    before deserializing (architecture, dtypes, PTX ISA, ptxas CUDA release, shared memory)."""
    keys = ("arch", "cc", "ptx_target", "ptx_version", "cuda_version", "triton_version", "shared", "static_shared",
            "kernel_name")
    return [{**{k: m.get(k) for k in keys}, "params_dtype": m["variant"]["params_dtype"],
             "out_dtype": m["variant"]["out_dtype"]} for m in (k.meta for k in pack.kernels)]


def check_plugin_kernels(sc: dict, sm: int, driver_cuda: tuple[int, int] | None,
                         shared_optin: int | None = None) -> None:
    """EngineError (with the fix) when the kernel the plugin would load on an sm_<sm> GPU cannot be
    loaded by a driver of CUDA version `driver_cuda` (a cubin made by a ptxas of a newer major CUDA,
    or PTX of a newer ISA than the driver JIT-compiles) or needs more shared memory per block than
    the GPU's opt-in limit `shared_optin`. Sidecars without the kernel list (older asap-deploy) are
    not checked here (the plugin checks again when it loads the kernel)."""
    from asap_deploy.plugins.cuda_driver import check_driver_can_load, check_shared_fits
    from asap_deploy.plugins.plugin_core import KernelPack, PackedKernel

    pl = sc.get("plugin") or {}
    entries = pl.get("kernels")
    if not isinstance(entries, list) or not entries:
        return
    metas = [dict(e, variant={"params_dtype": e.get("params_dtype"), "out_dtype": e.get("out_dtype")})
             for e in entries if isinstance(e, dict) and isinstance(e.get("cc"), int)]
    pack = KernelPack([PackedKernel(m, b"", b"") for m in metas])
    name = sc.get("engine", {}).get("file", "the engine")
    for pd, od in pack.dtypes():
        try:
            k, how = pack.select(sm, pd, od)
            if driver_cuda is not None:
                check_driver_can_load(k.meta, how, driver_cuda)
            if shared_optin is not None and isinstance(k.meta.get("shared"), int):
                check_shared_fits(k.meta, shared_optin)
        except KernelError as exc:
            raise EngineError(f"{name}: {exc.message}") from exc


def check_sidecar(sc: dict, engine_bytes: bytes | None = None, *, trt_version: str | None = None,
                  flavor: str | None = None, sm: int | None = None, bundle=None, plugin_version: str | None = None,
                  driver_cuda: tuple[int, int] | None = None, shared_optin: int | None = None) -> None:
    """EngineError naming the first mismatch and the command that rebuilds the engine. Only the
    facts given are checked (the runner gives all of them); `driver_cuda` / `shared_optin` (with
    `sm`): the plugin's kernel for that GPU must be loadable by a driver of that CUDA version and fit
    the GPU's shared memory per block (check_plugin_kernels)."""
    from asap_deploy.plugins.spec import PLUGIN_VERSION

    fix = f"rebuild it: {rebuild_command(sc)}"
    name = sc.get("engine", {}).get("file", "the engine")
    if engine_bytes is not None and sha256_bytes(engine_bytes) != sc.get("engine", {}).get("sha256"):
        raise EngineError(f"{name}: its sha256 does not match the sidecar (the engine or the sidecar was changed "
                          f"or replaced); {fix}")
    t = sc.get("tensorrt", {})
    if flavor is not None and t.get("flavor") != flavor:
        raise EngineError(f"{name}: built with {t.get('module')} ({t.get('flavor')}), but this runner uses {flavor}; {fix}")
    if trt_version is not None and t.get("version") != trt_version:
        raise EngineError(f"{name}: built with {t.get('module')} {t.get('version')}, installed is {trt_version} "
                          f"(engines are tied to the exact TensorRT version); {fix}")
    if sm is not None:
        targets = sc.get("targets", {}).get("sm", [])
        if sm not in targets:
            raise EngineError(f"{name}: built for {', '.join(f'sm_{s}' for s in targets) or 'no GPU'}, this GPU is "
                              f"sm_{sm}; {fix} --arch sm_{sm}")
    want_pv = plugin_version or PLUGIN_VERSION
    pl = sc.get("plugin")
    if pl is not None and pl.get("version") != want_pv:
        raise EngineError(f"{name}: its SpatialMLP plugin is version {pl.get('version')}, this asap-deploy has "
                          f"version {want_pv}; {fix}")
    if sm is not None and (driver_cuda is not None or shared_optin is not None):
        check_plugin_kernels(sc, sm, driver_cuda, shared_optin)
    if bundle is not None:
        src = sc.get("source_onnx", {})
        listed = bundle.manifest.get("files", {}).get(src.get("file"), {})
        if listed.get("sha256") != src.get("sha256"):
            raise EngineError(f"{name}: built from {src.get('file')} with sha256 {str(src.get('sha256'))[:16]}..., the "
                              f"bundle {bundle.path} has {str(listed.get('sha256'))[:16]}... (re-exported since); {fix}")


# ---- int8 graphs TensorRT takes -----------------------------------------------------------------
def tensorrt_qdq_problems(model) -> list[str]:
    """Why TensorRT would refuse the QDQ graph `model` (an onnx.ModelProto; empty: none found):
    TensorRT quantizes symmetrically to int8 (every zero point 0, the quantized type int8) and
    takes biases in float (no DequantizeLinear of int32). Checked in the graph and its functions."""
    import onnx
    from onnx import numpy_helper

    out = []
    for nodes, inits in [(model.graph.node, model.graph.initializer)] + [(f.node, ()) for f in model.functions]:
        tensors = {t.name: t for t in inits}
        tensors.update({n.output[0]: a.t for n in nodes if n.op_type == "Constant" for a in n.attribute
                        if a.name == "value"})
        for n in nodes:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            zp = tensors.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            x = tensors.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
            if x is not None and x.data_type == onnx.TensorProto.INT32:
                out.append(f"{n.name}: an int32 (bias) DequantizeLinear")
            elif zp is not None and zp.data_type != onnx.TensorProto.INT8:
                out.append(f"{n.name}: quantizes to {onnx.TensorProto.DataType.Name(zp.data_type).lower()}, not int8")
            elif zp is not None and bool((numpy_helper.to_array(zp) != 0).any()):
                out.append(f"{n.name}: a non-zero zero point (asymmetric quantization)")
    return out


# ---- building -------------------------------------------------------------------------------------
def _bundle_inputs(bundle) -> list[Path]:
    """The bundle's files (manifest and graphs): an engine, sidecar or timing cache never replaces one."""
    files = bundle.manifest.get("files", {}) if isinstance(bundle.manifest, dict) else {}
    return [bundle.path / "manifest.json", *(bundle.path / n for n in files if isinstance(n, str))]


def _check_engine_outputs(eng_path: Path, overwrite: bool, inputs) -> None:
    """OutputError unless the engine and its sidecar may be written: absent, or (with --overwrite)
    listed in their folder's ownership marker; never one of the bundle's files."""
    check_file_replaceable(eng_path, "engine", overwrite, inputs)
    check_file_replaceable(sidecar_path(eng_path), "engine sidecar", overwrite, inputs)


def _owner_kind(folder: Path, bundle) -> str:
    """The marker kind for a folder that gets its first engine: the bundle's own folder is a bundle."""
    try:
        same = os.path.samefile(folder, bundle.path)
    except OSError:
        same = False
    return "bundle" if same else "engines"


@dataclass
class BuildOptions:
    flavor: str = "rtx"
    stage: str = "all"
    fp16: bool = False
    int8: bool = False  # from the bundle's int8 (QDQ) graphs, `asap quantize --activations int8`
    profile: Profile | None = None
    archs: Sequence[int] | None = None  # None: rtx -> RTX_ARCHS; tensorrt -> this GPU
    out_dir: Path | None = None  # default: the bundle folder
    timing_cache: Path | None = None  # default: <bundle>/timing.<flavor>.cache (full TensorRT only)
    kernel_cache: Path | None = None
    overwrite: bool = True  # False (the CLI's default): refuse engines that exist, before building any


@dataclass
class BuiltEngine:
    path: Path
    sidecar: dict
    seconds: float


class _Logger:
    """Collects TensorRT's messages (errors go into the EngineError)."""

    def __init__(self, trt):
        class L(trt.ILogger):
            def __init__(inner):
                trt.ILogger.__init__(inner)
                inner.messages = []

            def log(inner, severity, msg):
                inner.messages.append((str(severity).rsplit(".", 1)[-1], str(msg)))

        self.logger = L()

    def errors(self) -> list[str]:
        return [m for s, m in self.logger.messages if s in ("ERROR", "INTERNAL_ERROR")]


def _targets(trt, flavor: str, archs: Sequence[int] | None) -> dict[str, Any]:
    from asap_deploy.plugins import cuda_driver, trt_compat

    if flavor == "rtx":
        archs = list(archs) if archs else list(RTX_ARCHS)
        bad = [a for a in archs if not hasattr(trt.ComputeCapability, f"SM{a}")]
        if bad:
            have = ", ".join(f"sm_{m[2:]}" for m in trt.ComputeCapability.__members__ if m.startswith("SM"))
            raise UsageError(f"TensorRT-RTX cannot target {', '.join(f'sm_{a}' for a in bad)} (it targets {have}; "
                             f"sm_90 H100/H200 needs --flavor tensorrt)")
        return {"kind": "rtx-compute-capabilities", "sm": archs, "built_on_gpu": False}
    trt_compat.require_gpu("building a TensorRT engine (--flavor tensorrt)")
    cc, name = cuda_driver.device_sm(0)
    if archs and list(archs) != [cc]:
        raise UsageError(f"--flavor tensorrt builds for the GPU it runs on (sm_{cc}, {name}); --arch "
                         f"{','.join(f'sm_{a}' for a in archs)} is only for --flavor rtx")
    return {"kind": "gpu", "sm": [cc], "gpu": name, "built_on_gpu": True}


def check_targets(flavor: str, archs: Sequence[int] | None = None) -> dict[str, Any]:
    """The targets a build of `flavor` for `archs` gets, checked before there is a bundle to build
    from (`asap export --engine`): TrtUnavailable naming the extra to install (or the GPU full
    TensorRT needs), UsageError for an architecture the flavour cannot target. Creates no TensorRT
    object."""
    from asap_deploy.plugins import trt_compat

    flavor = trt_compat.check_flavor(flavor)
    return _targets(trt_compat.import_trt(flavor), flavor, archs)


@dataclass
class _Plan:
    """What one `build_engines` call builds and where, settled before any TensorRT work."""

    bundle: Any
    options: BuildOptions
    flavor: str
    graphs: tuple[str, ...]
    profile: Profile
    precision: str
    out_dir: Path
    inputs: list[Path]  # the bundle's files: no output replaces one
    cache_path: Path  # the timing cache (full TensorRT only)


@dataclass
class _Job:
    """The plan plus what TensorRT and the bundle settle: the module, the targets, how fp16 is
    built, and the plugin's kernels (None when no graph has the plugin)."""

    plan: _Plan
    trt: Any
    targets: dict[str, Any]
    src_precision: str
    fp16_method: str | None
    strongly_typed: bool
    pack: Any


@dataclass
class _Serialized:
    """One engine as TensorRT built it, with the facts the sidecar records."""

    engine: bytes
    plugin_layers: list[str]
    profile_io: dict[str, dict[str, list[int]]]
    timing_cache: bool  # a timing cache was used (and saved, when asap owns it)


def _plan(bundle, options: BuildOptions) -> _Plan:
    """The flavor, graphs, profile and outputs; OutputError for an output that may not be written."""
    from asap_deploy.plugins import trt_compat

    flavor = trt_compat.check_flavor(options.flavor)
    graphs = stage_graphs(options.stage)
    S = bundle.config.S  # noqa: N806
    profile = (options.profile or default_profile(S)).check(S)
    if options.fp16 and options.int8:
        raise UsageError("--fp16 and --int8 build different engines: give one of them")
    precision = "int8" if options.int8 else "fp16" if options.fp16 else "fp32"
    out_dir = Path(options.out_dir) if options.out_dir else bundle.path
    inputs = _bundle_inputs(bundle)
    for g in graphs:  # before any TensorRT work: what exists is replaced only with --overwrite, and only if ours
        _check_engine_outputs(out_dir / engine_name(g, precision, flavor), options.overwrite, inputs)
    cache_path = Path(options.timing_cache) if options.timing_cache else bundle.path / f"timing.{flavor}.cache"
    if flavor == "tensorrt":
        check_not_input(cache_path, inputs, "timing cache")
    return _Plan(bundle, options, flavor, graphs, profile, precision, out_dir, inputs, cache_path)


def _prepare(plan: _Plan, progress: Callable[[str], None] | None) -> _Job:
    """Import TensorRT, check the targets, register the plugin, settle how fp16 is built and take
    the plugin's kernels (compiled or from the kernel cache)."""
    from asap_deploy.plugins import trt_compat

    bundle, options, flavor = plan.bundle, plan.options, plan.flavor
    trt = trt_compat.import_trt(flavor)  # TrtUnavailable: what to install
    targets = _targets(trt, flavor, options.archs)  # tensorrt: GPU checked before any TensorRT object
    if flavor == "rtx":
        trt_compat.ensure_rtx_parser_lib()  # before any parse: the parser would abort the process
    from asap_deploy.plugins import tensorrt as trt_plugin

    trt_plugin.register(trt)  # explicit: importing the plugin module registers nothing
    strong_only = trt_compat.strongly_typed_only(trt)
    if options.int8:
        from asap_deploy.precisions import QUANTIZED

        if QUANTIZED not in bundle.precisions:
            raise EngineError(f"{bundle.path}: no int8 graphs in this bundle; write them with: asap quantize "
                              f"{bundle.path} --calib MAPS --activations int8")
        src_precision, fp16_method = QUANTIZED, None
    elif options.fp16 and "fp16" not in bundle.precisions:
        if strong_only:
            raise EngineError(f"{bundle.path}: no fp16 graphs in this bundle, and {trt.__name__} "
                              f"{trt_compat.trt_version(trt)} builds fp16 only from an fp16 ONNX (strongly typed): "
                              f"re-export without --no-fp16")
        src_precision, fp16_method = "fp32", "builder-flag FP16 on the fp32 graph (weakly typed, TensorRT 10)"
    elif options.fp16:
        src_precision, fp16_method = "fp16", "fp16 ONNX graph built as is (strongly typed)"
    else:
        src_precision, fp16_method = "fp32", None
    strongly_typed = not (options.fp16 and src_precision == "fp32")
    precision = plan.precision
    if precision == "int8":  # the plugin runs fp32: the grid leaves the int8 predictor dequantized
        pairs = [("fp32", "fp32")]
    else:
        pairs = [(precision, precision)] if strongly_typed else [("fp32", "fp32"), ("fp16", "fp16")]

    pack = None
    if any(g in PLUGIN_GRAPHS for g in plan.graphs):
        pack = plugin_kernels(bundle.config, targets["sm"], pairs, options.kernel_cache, progress)
    return _Job(plan, trt, targets, src_precision, fp16_method, strongly_typed, pack)


def _read_source(job: _Job, graph: str) -> tuple[Path, bytes, str]:
    """The graph's ONNX (path, bytes, sha256), checked against the manifest once more."""
    bundle = job.plan.bundle
    src = bundle.file(graph, job.src_precision)
    data = src.read_bytes()
    src_sha = sha256_bytes(data)
    if src_sha != bundle.manifest["files"][src.name]["sha256"]:
        raise EngineError(f"{src}: changed since the bundle was loaded (sha256 differs from the manifest)")
    if job.src_precision == "int8":  # TensorRT's parser would refuse it node by node: say why and the fix, once
        import onnx

        problems = tensorrt_qdq_problems(onnx.load_model_from_string(data))
        if problems:
            raise EngineError(f"{src.name}: TensorRT builds symmetric int8 QDQ graphs only (zero points 0, int8, fp32 "
                              f"biases); this one has {len(problems)} node(s) it refuses ({problems[0]}). Re-quantize: "
                              f"asap quantize {bundle.path} --calib MAPS --activations int8 --overwrite")
    return src, data, src_sha


def _parse(job: _Job, graph: str, src: Path, data: bytes, builder, log: _Logger, progress):
    """The network of `src` (and its parser, which must outlive it), with this build's kernels
    attached to the plugin layers -> (network, parser, plugin layer names)."""
    from asap_deploy.plugins import tensorrt as trt_plugin
    from asap_deploy.plugins.spec import PLUGIN_NAME, PLUGIN_NAMESPACE

    trt = job.trt
    flags = 0
    if job.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log.logger)
    if progress:
        progress(f"parsing {src.name}")
    uses_plugin = graph in PLUGIN_GRAPHS
    ok = parser.parse(data, str(src))
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or log.errors()
        raise EngineError(f"{src.name}: the ONNX parser failed: {'; '.join(errs) or 'no message'}")
    plugin_layers = [network.get_layer(i).name for i in range(network.num_layers)
                     if str(network.get_layer(i).type).endswith("PLUGIN_V3")]
    if uses_plugin and not plugin_layers:
        raise EngineError(f"{src.name}: the parser did not map the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} node to the "
                          f"plugin (it inlined the ONNX function instead)")
    if uses_plugin:  # this network's plugins take this build's kernels (serialized with their fields)
        trt_plugin.attach_kernels(trt, network, job.pack)
    return network, parser, plugin_layers


def _builder_config(job: _Job, builder, network):
    """Targets, FP16 flag, the optimization profile and the timing cache -> (config, the profile per
    input, the timing cache or None)."""
    trt, plan = job.trt, job.plan
    config = builder.create_builder_config()
    if plan.flavor == "rtx":
        config.num_compute_capabilities = len(job.targets["sm"])
        for i, cc in enumerate(job.targets["sm"]):
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{cc}"), i)
    if not job.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    prof = builder.create_optimization_profile()
    profile_io = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        p = plan.profile.for_input(t.name, plan.bundle.config.S, plan.bundle.config.num_params)
        prof.set_shape(t.name, p["min"], p["opt"], p["max"])
        profile_io[t.name] = p
    config.add_optimization_profile(prof)
    timing = None
    cache_path = plan.cache_path
    if plan.flavor == "tensorrt" and hasattr(config, "create_timing_cache"):  # TensorRT-RTX: deprecated no-ops
        old = (read_regular_file(cache_path, "timing cache", MAX_TIMING_CACHE_BYTES, error=EngineError)
               if os.path.lexists(cache_path) else b"")
        timing = config.create_timing_cache(old)
        if timing is None and old:  # an unreadable/foreign cache: start a new one
            timing = config.create_timing_cache(b"")
        if timing is not None:
            config.set_timing_cache(timing, ignore_mismatch=False)
    return config, profile_io, timing


def _save_timing_cache(plan: _Plan, config) -> None:
    cache_path = plan.cache_path
    if not os.path.lexists(cache_path) or owns_file(cache_path):
        # a timing cache asap did not write is used as given, never replaced
        ser = config.get_timing_cache().serialize()
        claim_files(cache_path.parent, _owner_kind(cache_path.parent, plan.bundle), [cache_path.name])
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(ser))


def _serialize(job: _Job, graph: str, src: Path, data: bytes, progress) -> _Serialized:
    """Parse and build one engine (the TensorRT objects live only here); save the timing cache."""
    from asap_deploy.plugins.spec import PLUGIN_NAME

    trt, plan = job.trt, job.plan
    log = _Logger(trt)
    builder = trt.Builder(log.logger)
    network, parser, plugin_layers = _parse(job, graph, src, data, builder, log, progress)
    config, profile_io, timing = _builder_config(job, builder, network)
    if progress:
        progress(f"building {engine_name(graph, plan.precision, plan.flavor)} for "
                 f"{', '.join(f'sm_{s}' for s in job.targets['sm'])}")
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineError(f"{src.name}: TensorRT could not build the engine: "
                          f"{'; '.join(log.errors()) or 'no message (run with --debug for the log)'}")
    engine = bytes(blob)
    if graph in PLUGIN_GRAPHS:
        if PLUGIN_NAME.encode() not in engine or job.pack.to_bytes() not in engine:
            raise EngineError(f"{src.name}: the engine was built without the plugin's kernels in its fields "
                              f"(get_fields_to_serialize failed): {'; '.join(log.errors()) or 'no message'}")
    if timing is not None:
        _save_timing_cache(plan, config)
    del network, parser, builder, config  # in this order: the network before its parser and builder
    return _Serialized(engine, plugin_layers, profile_io, timing is not None)


def _sidecar(job: _Job, graph: str, eng_path: Path, src: Path, src_sha: str, built: _Serialized) -> dict:
    """What the engine was built from and for (read back by read_sidecar / check_sidecar)."""
    from asap_deploy.plugins import trt_compat
    from asap_deploy.plugins.spec import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

    plan, pack, trt, engine = job.plan, job.pack, job.trt, built.engine
    bundle = plan.bundle
    return {
        "schema": SIDECAR_SCHEMA,
        "schema_version": SIDECAR_VERSION,
        "engine": {"file": eng_path.name, "sha256": sha256_bytes(engine), "bytes": len(engine)},
        "graph": graph,
        "precision": plan.precision,
        "fp16_method": job.fp16_method,
        "strongly_typed": job.strongly_typed,
        "source_onnx": {"file": src.name, "sha256": src_sha},
        "bundle": {"path": str(bundle.path), "weights_sha256": bundle.manifest.get("source", {}).get("weights_sha256"),
                   "S": bundle.config.S, "num_params": bundle.config.num_params},
        "tensorrt": {"flavor": plan.flavor, "module": trt.__name__, "version": trt_compat.trt_version(trt)},
        "targets": job.targets,
        "plugin": ({"name": PLUGIN_NAME, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION,
                    "layers": built.plugin_layers, "kernel_archs": pack.archs(),
                    "kernel_dtypes": [list(d) for d in pack.dtypes()],
                    "triton_version": pack.kernels[0].meta.get("triton_version"),
                    "kernels": sidecar_kernels(pack),
                    "kernel_pack_sha256": sha256_bytes(pack.to_bytes())} if graph in PLUGIN_GRAPHS else None),
        "profile": {"labels_NHW": plan.profile.to_dict(), "inputs": built.profile_io},
        "io": bundle.manifest.get("graphs", {}).get(graph, {}),
        "timing_cache": str(plan.cache_path) if built.timing_cache else None,
    }


def _write_engine(plan: _Plan, eng_path: Path, engine: bytes, sidecar: dict) -> None:
    """The engine and its sidecar, each atomically, recorded in the folder's ownership marker."""
    _check_engine_outputs(eng_path, plan.options.overwrite, plan.inputs)  # again: the folder may have changed meanwhile
    claim_files(plan.out_dir, _owner_kind(plan.out_dir, plan.bundle), [eng_path.name, sidecar_path(eng_path).name])
    with atomic_path(eng_path) as tmp:
        tmp.write_bytes(engine)
    write_json(sidecar_path(eng_path), sidecar)


def build_engines(bundle, options: BuildOptions, progress: Callable[[str], None] | None = None) -> list[BuiltEngine]:
    """Build the engines of `options.stage` for a loaded (hash-checked) bundle."""
    import time

    job = _prepare(_plan(bundle, options), progress)
    built = []
    for graph in job.plan.graphs:
        t0 = time.perf_counter()
        src, data, src_sha = _read_source(job, graph)
        engine = _serialize(job, graph, src, data, progress)
        eng_path = job.plan.out_dir / engine_name(graph, job.plan.precision, job.plan.flavor)
        sidecar = _sidecar(job, graph, eng_path, src, src_sha, engine)
        _write_engine(job.plan, eng_path, engine.engine, sidecar)
        built.append(BuiltEngine(eng_path, sidecar, time.perf_counter() - t0))
    return built
