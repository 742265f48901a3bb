"""Importing TensorRT (`tensorrt`, 10.x/11.x) or TensorRT-RTX (`tensorrt_rtx`), and what each needs.

* `import_trt(flavor)` returns the module (TrtUnavailable naming what to install when absent).
  `default_flavor()`: $ASAP_TRT_FLAVOR, else `tensorrt` when importable, else `rtx`.
* The TensorRT-RTX 1.7.1 pip wheel ships `libtensorrt_rtx.so.1` only, but its ONNX parser
  dlopen()s `libtensorrt_rtx.so` when it imports a plugin node: without a fix the process aborts
  ("terminate called without an active exception", no Python error). `ensure_rtx_parser_lib()`
  makes the unversioned name resolvable BEFORE any parse:
    1. already there (package folder, or a folder on LD_LIBRARY_PATH): nothing to do;
    2. the package folder (the parser's $ORIGIN) is writable: a symlink is created there (atomic);
    3. otherwise: a symlink in a cache folder, and RtxLibraryPathError, which says to start the
       process with LD_LIBRARY_PATH including that folder (`asap` re-executes itself that way;
       dlopen reads LD_LIBRARY_PATH only at process start, and ctypes preloading does not help).
  Never parse with TensorRT-RTX without calling it (build.py does).
* `require_gpu(what)` checks for a CUDA driver + device (plugins/cuda_driver.py) BEFORE any
  TensorRT object exists (a runtime without a driver logs error 35 and then segfaults on deserialize).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from asap_deploy.errors import AsapError, MissingDependencyError
from asap_deploy.io import cache_root

from .cuda_driver import cuda_device_count

FLAVORS = ("tensorrt", "rtx")
MODULES = {"tensorrt": "tensorrt", "rtx": "tensorrt_rtx"}
INSTALL = {
    "tensorrt": "pip install 'asap-deploy[tensorrt]' (full TensorRT; its libraries come from NVIDIA's package "
                "index, pypi.nvidia.com; needs an NVIDIA GPU + driver to build and run engines)",
    "rtx": "pip install 'asap-deploy[rtx]' (tensorrt-rtx-cu13: builds engines ahead of time, even without a GPU)",
}
RTX_LIB = "libtensorrt_rtx.so"
RTX_LIB_VERSIONED = "libtensorrt_rtx.so.1"
RTX_LIBS_PACKAGE = "tensorrt_rtx_libs"


class TrtUnavailable(MissingDependencyError):
    """TensorRT / TensorRT-RTX (or a GPU it needs) is not available here."""


class RtxLibraryPathError(AsapError):
    """The process must be restarted with LD_LIBRARY_PATH including `folder` (see the module doc)."""

    exit_code = 6

    def __init__(self, message: str, folder: Path):
        super().__init__(message)
        self.folder = folder


def default_flavor() -> str:
    env = os.environ.get("ASAP_TRT_FLAVOR", "").strip().lower()
    if env in FLAVORS:
        return env
    for flavor in FLAVORS:
        if importlib.util.find_spec(MODULES[flavor]) is not None:
            return flavor
    return "tensorrt"


def check_flavor(flavor: str) -> str:
    f = {"tensorrt_rtx": "rtx", "trt": "tensorrt", "tensorrt-rtx": "rtx"}.get(flavor, flavor)
    if f not in FLAVORS:
        from asap_deploy.errors import UsageError

        raise UsageError(f"unknown TensorRT flavour {flavor!r} (choose from: {', '.join(FLAVORS)})")
    return f


def import_trt(flavor: str):
    """The `tensorrt` or `tensorrt_rtx` module; TrtUnavailable saying what to install."""
    flavor = check_flavor(flavor)
    try:
        return importlib.import_module(MODULES[flavor])
    except ImportError as exc:
        raise TrtUnavailable(f"{MODULES[flavor]} is not installed ({exc}). Install it with: {INSTALL[flavor]}") from exc


def flavor_of(trt) -> str:
    return "rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"


def trt_version(trt) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def trt_major(trt) -> int:
    m = re.match(r"(\d+)", trt_version(trt))
    return int(m.group(1)) if m else 0


def strongly_typed_only(trt) -> bool:
    """TensorRT 11 and TensorRT-RTX have no weakly-typed networks (no BuilderFlag.FP16)."""
    return flavor_of(trt) == "rtx" or trt_major(trt) >= 11 or not hasattr(trt.BuilderFlag, "FP16")


# ---- the TensorRT-RTX packaging bug -----------------------------------------------------------
@dataclass(frozen=True)
class RtxLibFix:
    how: str  # "present" | "ld_library_path" | "symlink"
    path: Path


def rtx_libs_dir() -> Path:
    """The folder of the installed tensorrt_rtx_libs package (TrtUnavailable when absent)."""
    spec = importlib.util.find_spec(RTX_LIBS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TrtUnavailable(f"{RTX_LIBS_PACKAGE} is not installed. Install TensorRT-RTX with: {INSTALL['rtx']}")
    return Path(list(spec.submodule_search_locations)[0])


def default_cache_dir() -> Path:
    return cache_root() / "tensorrt-rtx-libs"


def _symlink(target: Path, link: Path) -> None:
    """Create `link -> target` atomically (a concurrent process may race us: both succeed)."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def ensure_rtx_parser_lib(libs_dir: Path | None = None, cache_dir: Path | None = None,
                          ld_library_path: str | None = None) -> RtxLibFix:
    """Make `libtensorrt_rtx.so` resolvable for the TensorRT-RTX ONNX parser (see the module doc).
    Raises RtxLibraryPathError when only a restart with LD_LIBRARY_PATH can fix it."""
    libs_dir = Path(libs_dir) if libs_dir is not None else rtx_libs_dir()
    real = libs_dir / RTX_LIB_VERSIONED
    link = libs_dir / RTX_LIB
    if link.exists():
        return RtxLibFix("present", link)
    ld = os.environ.get("LD_LIBRARY_PATH", "") if ld_library_path is None else ld_library_path
    for d in filter(None, ld.split(os.pathsep)):
        if (Path(d) / RTX_LIB).exists():
            return RtxLibFix("ld_library_path", Path(d) / RTX_LIB)
    if not real.exists():
        raise TrtUnavailable(f"{real}: missing; the TensorRT-RTX install is incomplete. Reinstall it: {INSTALL['rtx']}")
    try:
        _symlink(Path(RTX_LIB_VERSIONED), link)  # relative: the folder may move with its venv
        return RtxLibFix("symlink", link)
    except OSError:
        pass  # read-only install: fall back to a cache folder + LD_LIBRARY_PATH
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _symlink(real.resolve(), cache / RTX_LIB)
    except OSError as exc:
        raise RtxLibraryPathError(
            f"TensorRT-RTX's ONNX parser needs {RTX_LIB} but the wheel ships only {RTX_LIB_VERSIONED} in {libs_dir} "
            f"(read-only), and {cache} cannot be written ({exc.strerror}). Create the link yourself: "
            f"ln -s {real} DIR/{RTX_LIB}; export LD_LIBRARY_PATH=DIR:$LD_LIBRARY_PATH", cache) from exc
    raise RtxLibraryPathError(
        f"TensorRT-RTX's ONNX parser needs {RTX_LIB} (the wheel ships only {RTX_LIB_VERSIONED}, in a read-only "
        f"folder); a link was made in {cache}: start the process with LD_LIBRARY_PATH={cache}"
        f"{os.pathsep}$LD_LIBRARY_PATH (the `asap` command does this by itself)", cache)


def reexec_env(folder: Path) -> dict[str, str]:
    """Environment for re-executing this process with `folder` first on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    old = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = str(folder) + (os.pathsep + old if old else "")
    env["ASAP_RTX_REEXEC"] = "1"  # guards against a loop
    return env


def reexec_with_library_path(folder: Path) -> None:  # pragma: no cover - replaces the process
    """Replace this process by itself with LD_LIBRARY_PATH fixed (CLI only; never returns)."""
    if os.environ.get("ASAP_RTX_REEXEC"):
        raise RtxLibraryPathError(f"LD_LIBRARY_PATH includes {folder} and {RTX_LIB} is still not found", folder)
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], reexec_env(folder))


# ---- a GPU, checked before any TensorRT object ------------------------------------------------
def require_gpu(what: str) -> int:
    n, why = cuda_device_count()
    if n == 0:
        raise TrtUnavailable(f"{what} needs an NVIDIA GPU with its driver: {why}")
    return n

