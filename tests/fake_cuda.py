"""A fake cuda-python driver module for the kernel-loading paths (launcher, plugin enqueue) on CPU:
a primary context per device made current per thread, module loads counted, device attributes
(compute capability, opt-in shared memory) and the driver's CUDA version set by the test."""

from __future__ import annotations

import enum
import threading
from types import SimpleNamespace


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_INVALID_IMAGE = 200
    CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222


OK = CUresult.CUDA_SUCCESS


class FakeKernelDriver:
    """Enough of `cuda.bindings.driver` for DriverKernel and SpatialMLPCore.kernel_for."""

    CUresult = CUresult
    CUdevice_attribute = SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="cc_major",
                                         CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="cc_minor",
                                         CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN="smem_optin")
    CUfunction_attribute = SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="max_dyn_smem",
                                           CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES="static_smem")

    def __init__(self, cc: int = 86, smem_optin: int = 101376, cuda_version: int = 13000, static_smem: int = 0):
        self.cc, self.smem_optin, self.cuda_version, self.static_smem = cc, smem_optin, cuda_version, static_smem
        self.current: dict[int, int] = {}  # thread -> context
        self.calls: list[str] = []
        self.modules: list[bytes] = []  # images loaded, in order
        self.func_attrs: list[tuple] = []
        self.launches: list[tuple] = []

    @staticmethod
    def CUstream(v):  # noqa: N802 - the binding's name
        return int(v)

    def _call(self, name):
        self.calls.append(name)

    def cuGetErrorName(self, err):
        return OK, CUresult(int(err)).name.encode()

    def cuInit(self, flags):
        self._call("cuInit")
        return (OK,)

    def cuDriverGetVersion(self):
        self._call("cuDriverGetVersion")
        return OK, self.cuda_version

    def cuCtxGetCurrent(self):
        self._call("cuCtxGetCurrent")
        return OK, self.current.get(threading.get_ident(), 0)

    def cuCtxGetDevice(self):
        self._call("cuCtxGetDevice")
        if not self.current.get(threading.get_ident()):
            return CUresult.CUDA_ERROR_INVALID_CONTEXT, None
        return OK, 0

    def cuDeviceGet(self, ordinal):
        self._call("cuDeviceGet")
        return OK, int(ordinal)

    def cuDevicePrimaryCtxRetain(self, dev):
        self._call("cuDevicePrimaryCtxRetain")
        return OK, 0xC0 + int(dev)

    def cuCtxSetCurrent(self, ctx):
        self._call("cuCtxSetCurrent")
        self.current[threading.get_ident()] = int(ctx)
        return (OK,)

    def cuDeviceGetAttribute(self, attr, dev):
        self._call(f"cuDeviceGetAttribute({attr})")
        return OK, {"cc_major": self.cc // 10, "cc_minor": self.cc % 10, "smem_optin": self.smem_optin}[attr]

    def cuModuleLoadData(self, image):
        self._call("cuModuleLoadData")
        if not self.current.get(threading.get_ident()):
            return CUresult.CUDA_ERROR_INVALID_CONTEXT, None
        self.modules.append(bytes(image))
        return OK, 0x5000 + len(self.modules)

    def cuModuleGetFunction(self, module, name):
        self._call("cuModuleGetFunction")
        return OK, int(module) + 0x100

    def cuFuncGetAttribute(self, attr, fn):
        self._call(f"cuFuncGetAttribute({attr})")
        return OK, {"static_smem": self.static_smem}[attr]

    def cuFuncSetAttribute(self, fn, attr, value):
        self._call("cuFuncSetAttribute")
        if attr == "max_dyn_smem" and value + self.static_smem > self.smem_optin:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.func_attrs.append((fn, attr, value))
        return (OK,)

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, args, extra):
        self._call("cuLaunchKernel")
        self.launches.append((fn, (gx, gy, gz), (bx, by, bz), shared, stream))
        return (OK,)

    def cuModuleUnload(self, module):
        self._call("cuModuleUnload")
        return (OK,)
