"""The CUDA driver API through cuda-python: the module, checked calls, devices. No torch, no Triton.

Shared by the driver-only launcher, the plugin's enqueue path and the TensorRT runner, and asked
BEFORE any TensorRT object exists (a TensorRT runtime without a driver logs error 35 and then
segfaults on deserialize).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from asap_deploy.errors import KernelError, MissingDependencyError

# PTX ISA version -> the first CUDA release whose driver JIT-compiles it (the PTX ISA manual's
# release history; the same table as cuda-python's
# cuda.bindings.utils.get_minimal_required_cuda_ver_from_ptx_ver, plus ISA 9.4 = CUDA 13.4). A
# newer 9.x is taken as CUDA 13.x, the pattern since ISA 9.0 (`min_cuda_for_ptx`).
PTX_ISA_CUDA: dict[str, tuple[int, int]] = {
    "7.0": (11, 0), "7.1": (11, 1), "7.2": (11, 2), "7.3": (11, 3), "7.4": (11, 4), "7.5": (11, 5),
    "7.6": (11, 6), "7.7": (11, 7), "7.8": (11, 8),
    "8.0": (12, 0), "8.1": (12, 1), "8.2": (12, 2), "8.3": (12, 3), "8.4": (12, 4), "8.5": (12, 5),
    "8.6": (12, 7), "8.7": (12, 8), "8.8": (12, 9),
    "9.0": (13, 0), "9.1": (13, 1), "9.2": (13, 2), "9.3": (13, 3), "9.4": (13, 4),
}


def driver():
    """cuda-python's driver module; MissingDependencyError saying what to install."""
    try:
        from cuda.bindings import driver as drv  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as drv  # older cuda-python
        except ImportError as exc:
            raise MissingDependencyError("the driver-only launcher needs cuda-python: "
                                         "pip install 'asap-deploy[gpu]'") from exc
    return drv


def check(drv, result, what: str):
    """The value(s) of a cuda-python call's `(err, *values)` result; KernelError naming `what` and
    the driver's error name on failure."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != int(drv.CUresult.CUDA_SUCCESS):
        _, name = drv.cuGetErrorName(err)
        raise KernelError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return rest[0] if len(rest) == 1 else rest


def cuda_device_count() -> tuple[int, str]:
    """(number of CUDA devices, reason when 0) via the driver API only; never raises."""
    try:
        drv = driver()
    except MissingDependencyError:
        return 0, "cuda-python is not installed (pip install cuda-python)"
    try:
        (err,) = drv.cuInit(0)
    except Exception as exc:  # noqa: BLE001 - cuda-python raises loader errors of several types without a driver
        return 0, f"no CUDA driver ({type(exc).__name__}: {exc})"
    if int(err) != 0:
        return 0, f"no usable CUDA driver (cuInit: {err})"
    err, n = drv.cuDeviceGetCount()
    if int(err) != 0 or int(n) == 0:
        return 0, "no CUDA device"
    return int(n), ""


def device_sm(device: int = 0) -> tuple[int, str]:
    """(compute capability as 86 etc., device name) of a CUDA device via the driver API."""
    drv = driver()
    attr = drv.CUdevice_attribute
    err, dev = drv.cuDeviceGet(device)
    _, major = drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    _, minor = drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    _, name = drv.cuDeviceGetName(64, dev)
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    return int(major) * 10 + int(minor), name


def parse_cuda_version(text) -> tuple[int, int]:
    """'13.4' (or 'release 13.4, V13.4.59') -> (13, 4); KernelError otherwise."""
    m = re.search(r"(\d+)\.(\d+)", str(text))
    if not m:
        raise KernelError(f"cannot read a CUDA version from {str(text)[:60]!r}")
    return int(m.group(1)), int(m.group(2))


def min_cuda_for_ptx(ptx_version: str) -> tuple[int, int]:
    """The oldest CUDA whose driver JIT-compiles PTX of ISA `ptx_version` ('8.7' -> (12, 8))."""
    v = str(ptx_version)
    if v in PTX_ISA_CUDA:
        return PTX_ISA_CUDA[v]
    major, minor = parse_cuda_version(v)
    if major >= 9:  # ISA 9.x came with CUDA 13.x; later ones are assumed to keep the step
        return major + 4, minor
    raise KernelError(f"PTX ISA {v} is not in the table of PTX ISA versions this asap-deploy knows")


def device_shared_optin(device: int | None = None, drv=None) -> int:
    """Bytes of shared memory one block may use on `device` (the current context's device when None)
    after opting in: CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN."""
    drv = drv or driver()
    dev = check(drv, drv.cuCtxGetDevice(), "cuCtxGetDevice") if device is None else \
        check(drv, drv.cuDeviceGet(device), "cuDeviceGet")
    attr = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    return int(check(drv, drv.cuDeviceGetAttribute(attr, dev), "cuDeviceGetAttribute(shared memory opt-in)"))


def check_shared_fits(meta: Mapping[str, Any], optin: int, static: int | None = None) -> None:
    """KernelError when the kernel of `meta` needs more shared memory per block than `optin` bytes
    (the device's opt-in limit), counting its dynamic shared memory (`shared`, what Triton asks at
    launch) plus its static shared memory (`static`, else the metadata's `static_shared`): the
    driver requires their sum within the limit; cuFuncSetAttribute / the launch would fail inside it."""
    dynamic = int(meta.get("shared", 0))
    static = int(meta.get("static_shared", 0) if static is None else static)
    if dynamic + static > optin:
        extra = f" ({dynamic:,} dynamic + {static:,} static)" if static else ""
        raise KernelError(f"{meta.get('kernel_name')} (compiled for {meta.get('arch')}) needs {dynamic + static:,} bytes "
                          f"of shared memory per block{extra}, and this GPU allows {optin:,} per block (opt-in limit): "
                          f"recompile for this GPU's architecture (asap build-engine / asap compile-kernels --arch "
                          f"sm_XY of this GPU), which picks a kernel variant that fits it")


def driver_version(drv=None) -> tuple[int, int]:
    """(major, minor) CUDA version of the installed driver (`cuDriverGetVersion`: 13000 -> (13, 0))."""
    drv = drv or driver()
    v = int(check(drv, drv.cuDriverGetVersion(), "cuDriverGetVersion"))
    return v // 1000, v % 1000 // 10


def driver_requirement(meta: Mapping[str, Any], how: str) -> tuple[tuple[int, int], str] | None:
    """(oldest driver CUDA version, why) that loads a kernel of metadata `meta` as `how` ('cubin' or
    'ptx'); None when the metadata does not say (compiled by an older asap-deploy).
    PTX: the driver JIT-compiles it, so it needs the CUDA release of the PTX ISA. Cubin: a driver of
    an older minor version of the same major loads it (minor-version compatibility), one of an
    older major does not."""
    isa, cuda = meta.get("ptx_version"), meta.get("cuda_version")
    if how == "ptx":
        if not isa:
            return None
        need = min_cuda_for_ptx(isa)
        return need, f"JIT-compiling its PTX (ISA {isa}) needs a driver for CUDA >= {need[0]}.{need[1]}"
    made = parse_cuda_version(cuda) if cuda else (min_cuda_for_ptx(isa) if isa else None)
    if made is None:
        return None
    return (made[0], 0), (f"loading its cubin needs a driver for CUDA {made[0]}.x (minor-version compatibility "
                          f"covers older minor versions of the same major only)")


def check_driver_can_load(meta: Mapping[str, Any], how: str, have: tuple[int, int]) -> None:
    """KernelError, saying how to fix it, when a driver of CUDA version `have` cannot load the kernel
    of `meta` as `how` ('cubin' or 'ptx'): refused here instead of failing inside the driver."""
    req = driver_requirement(meta, how)
    if req is None or have >= req[0]:
        return
    _, why = req
    made = f"the ptxas of CUDA {meta['cuda_version']}" if meta.get("cuda_version") else "ptxas"
    raise KernelError(
        f"{meta.get('kernel_name')} for {meta.get('arch')} was compiled by Triton {meta.get('triton_version')} with "
        f"{made} (PTX ISA {meta.get('ptx_version')}); {why}, and this driver supports CUDA {have[0]}.{have[1]}. "
        f"Fix: rebuild the kernels / engine with a Triton whose ptxas is no newer than CUDA {have[0]}.{have[1]} "
        f"(e.g. the Triton installed on this GPU host: run `asap build-engine` / `asap compile-kernels` on the GPU "
        f"host), or update the NVIDIA driver")
