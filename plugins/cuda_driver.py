"""The CUDA driver API through cuda-python: the module, checked calls, devices. No torch, no Triton.

Shared by the driver-only launcher, the plugin's enqueue path and the TensorRT runner, and asked
BEFORE any TensorRT object exists (a TensorRT runtime without a driver logs error 35 and then
segfaults on deserialize).
"""

from __future__ import annotations

from asap_deploy.errors import KernelError, MissingDependencyError


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
