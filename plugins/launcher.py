"""Driver-only launcher: runs an AOT-compiled kernel (plugins/aot.py) with nothing but the CUDA
driver, through cuda-python (`cuModuleLoadData` + `cuLaunchKernel`). No torch, no Triton.

This is what the TensorRT plugin calls from `enqueue` with raw device pointers and TensorRT's
stream. Argument packing (`pack_args`) is pure ctypes and is unit-tested without a GPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from asap_deploy.config import padded_size
from asap_deploy.errors import KernelError

from .aot import load_index, load_metadata, read_images
from .cuda_driver import check, check_driver_can_load, check_shared_fits, device_shared_optin, driver, driver_version

_CTYPES = {"i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64, "u64": ctypes.c_uint64,
           "fp32": ctypes.c_float, "i1": ctypes.c_int32}
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
DEFAULT_SHARED_LIMIT = 48 * 1024  # static + dynamic above this: the kernel must opt in (cuFuncSetAttribute)


def _ctype(type_str: str):
    if type_str.startswith("*"):
        return ctypes.c_void_p
    if type_str not in _CTYPES:
        raise KernelError(f"kernel argument type {type_str!r} is not supported by the driver-only launcher")
    return _CTYPES[type_str]


@dataclass
class PackedArgs:
    """ctypes storage for every kernel parameter, and the void** array cuLaunchKernel takes.
    Keep this object alive until the launch has been enqueued."""

    names: list[str]
    values: list[Any]  # ctypes scalars, in kernel parameter order (hidden ones last)
    pointers: Any = field(repr=False)  # (ctypes.c_void_p * n): addresses of `values`

    @property
    def address(self) -> int:
        return ctypes.addressof(self.pointers)

    def sizes(self) -> list[int]:
        return [ctypes.sizeof(v) for v in self.values]


def pack_args(meta: Mapping, values: Mapping[str, int | float]) -> PackedArgs:
    """Pack the runtime arguments named in `meta['args']` (pointers as ints) followed by the hidden
    trailing arguments of `meta['hidden_args']` (null scratch pointers), as cuLaunchKernel expects."""
    args = list(meta["args"])
    names = [a["name"] for a in args]
    missing = [n for n in names if n not in values]
    unknown = sorted(set(values) - set(names))
    if missing or unknown:
        raise KernelError(f"{meta.get('kernel_name')}: launch arguments missing {missing or '[]'}, "
                          f"unknown {unknown or '[]'}")
    align = int(meta.get("pointer_align", 1))
    storage = []
    for a in args:
        ct, v = _ctype(a["type"]), values[a["name"]]
        if a["type"].startswith("*"):
            v = int(v)
            if v % align:
                raise KernelError(f"{meta.get('kernel_name')}: pointer {a['name']}=0x{v:x} is not {align}-byte "
                                  f"aligned, which the compiled kernel assumes")
        elif a["type"] == "i32":
            v = int(v)
            if not _I32_MIN <= v <= _I32_MAX:
                raise KernelError(f"{meta.get('kernel_name')}: {a['name']}={v} does not fit the kernel's int32 "
                                  f"argument (tensor too large for this kernel)")
        storage.append(ct(v))
    for h in meta["hidden_args"]:
        names.append(h["name"])
        storage.append(_ctype(h["type"])(int(h.get("value", 0))))
    ptr_array = (ctypes.c_void_p * len(storage))(*[ctypes.addressof(s) for s in storage])
    return PackedArgs(names, storage, ptr_array)


def grid_for(meta: Mapping, **sizes: int) -> tuple[int, int, int]:
    """Launch grid from the metadata's rule. spatial_mlp: N, H, W; repack: n_tiles, P."""
    rule = meta["grid_rule"]
    if meta.get("kind") == "repack":
        return (-(-sizes["n_tiles"] // rule["BLOCK_T"]), -(-sizes["P"] // rule["BLOCK_C"]), 1)
    s = rule["S"]
    n, h, w = sizes["N"], sizes["H"], sizes["W"]
    if padded_size(h, w, s) != (h, w):
        raise KernelError(f"image size {h}x{w} is not a multiple of S={s}")
    return (n * (h // s) * (w // s) * rule["programs_per_tile"], 1, 1)


# Launch options Triton records in the metadata (aot.py) and their only values cuLaunchKernel gives:
# a kernel compiled for thread-block clusters (num_ctas > 1), programmatic dependent launch or a
# cooperative grid needs cuLaunchKernelEx with launch attributes, which this launcher does not use.
DEFAULT_LAUNCH_OPTIONS = {"num_ctas": 1, "launch_pdl": False, "launch_cooperative_grid": False}


def check_launch_options(meta: Mapping) -> None:
    """KernelError naming the first launch option in `meta` that plain cuLaunchKernel cannot honour
    (metadata without the field means the default)."""
    for name, default in DEFAULT_LAUNCH_OPTIONS.items():
        value = meta.get(name, default)
        if value != default:
            raise KernelError(f"{meta.get('kernel_name')} ({meta.get('arch')}): compiled with {name}={value!r}; the "
                              f"driver-only launcher uses cuLaunchKernel, which launches only {name}={default!r}. "
                              f"Recompile it without that option (asap compile-kernels / asap build-engine)")


def bind_context(device: int = 0) -> tuple[int, int]:
    """(context, device ordinal) current on the calling thread: the current context, else `device`'s
    primary context, retained and made current. Whoever caches per context (the plugin's kernels)
    asks this BEFORE taking its key, so the key names the context the module is loaded into."""
    drv = driver()
    try:
        res = drv.cuInit(0)
    except Exception as exc:  # noqa: BLE001 - cuda-python raises a loader error when no driver exists
        raise KernelError(f"no CUDA driver on this machine ({type(exc).__name__}): the driver-only launcher "
                          f"needs an NVIDIA GPU and its driver") from exc
    check(drv, res, "cuInit")
    ctx = check(drv, drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if not int(ctx):
        dev = check(drv, drv.cuDeviceGet(device), "cuDeviceGet")
        ctx = check(drv, drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        check(drv, drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    dev = check(drv, drv.cuCtxGetDevice(), "cuCtxGetDevice")
    return int(ctx), int(dev)


class DriverKernel:
    """One compiled kernel loaded into the current CUDA context (or the primary context of
    `device` when none is current)."""

    def __init__(self, meta: Mapping, image: bytes, device: int = 0):
        self.meta = dict(meta)
        self.image = image
        self.device = device
        self._module = self._function = None

    @classmethod
    def from_json(cls, path: str | Path, device: int = 0, prefer: str = "cubin") -> "DriverKernel":
        path = Path(path)
        meta = load_metadata(path)
        cubin, ptx = read_images(meta, path.parent)  # inside the folder, checked against the recorded sha256
        data = ptx if prefer == "ptx" else cubin
        if prefer == "ptx":
            data += b"\0"
        return cls(meta, data, device)

    def load(self) -> "DriverKernel":
        if self._function is not None:
            return self
        check_launch_options(self.meta)  # before the driver: a kernel it would launch wrongly is never loaded
        drv = driver()
        bind_context(self.device)
        # an image this driver cannot load is refused with the fix, not left to fail inside the driver
        check_driver_can_load(self.meta, self.image_kind, driver_version(drv))
        shared = int(self.meta["shared"])  # dynamic: what the launch asks for
        static = int(self.meta.get("static_shared", 0))  # recorded from the cubin by aot.py
        optin = device_shared_optin(None, drv) if shared + static > DEFAULT_SHARED_LIMIT else None
        if optin is not None:  # above 48 KiB the device's opt-in limit decides: asked before loading
            check_shared_fits(self.meta, optin, static)
        self._module = check(drv, drv.cuModuleLoadData(self.image), f"cuModuleLoadData({self.meta['kernel_name']})")
        self._function = check(drv, drv.cuModuleGetFunction(self._module, self.meta["kernel_name"].encode()),
                                "cuModuleGetFunction")
        fattr = drv.CUfunction_attribute
        static = int(check(drv, drv.cuFuncGetAttribute(fattr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, self._function),
                           "cuFuncGetAttribute(static shared)"))  # the driver's own figure
        if shared + static > DEFAULT_SHARED_LIMIT:
            try:
                check_shared_fits(self.meta, optin if optin is not None else device_shared_optin(None, drv), static)
            except KernelError:
                self.unload()
                raise
            check(drv, drv.cuFuncSetAttribute(self._function, fattr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                              shared), "cuFuncSetAttribute(shared)")
        return self

    @property
    def image_kind(self) -> str:
        """'cubin' (an ELF image) or 'ptx' (text the driver JIT-compiles)."""
        return "cubin" if bytes(self.image[:4]) == b"\x7fELF" else "ptx"

    def launch(self, grid: Sequence[int], values: Mapping[str, int | float], stream: int = 0) -> None:
        self.load()
        drv = driver()
        packed = pack_args(self.meta, values)
        bx, by, bz = self.meta["block"]
        check(drv, drv.cuLaunchKernel(self._function, int(grid[0]), int(grid[1]), int(grid[2]), bx, by, bz,
                                       int(self.meta["shared"]), drv.CUstream(int(stream)), packed.address, 0),
               f"cuLaunchKernel({self.meta['kernel_name']})")

    def unload(self) -> None:
        if self._module is not None:
            drv = driver()
            check(drv, drv.cuModuleUnload(self._module), "cuModuleUnload")
            self._module = self._function = None


def spatial_mlp_values(*, ids, params, out, N, H, W, S, n_lab, dontcare_ch, params_strides, out_strides,
                       extra=None) -> dict:
    """Name -> value for the fused kernel's runtime arguments. Strides in elements: params
    (n, c, y, x) of the (N, P, H/S, W/S)-indexed grid, out (n, y, x, c) of the (N, H, W, C)-indexed output."""
    del N
    p = dict(zip(("p_sn", "p_sc", "p_sy", "p_sx"), params_strides))
    o = dict(zip(("o_sn", "o_sy", "o_sx", "o_sc"), out_strides))
    return {"ids_ptr": ids, "params_ptr": params, "extra_ptr": ids if extra is None else extra, "H": H, "W": W,
            "n_tiles_h": H // S, "n_tiles_w": W // S, "n_lab": n_lab, "dontcare_ch": dontcare_ch, **p, **o,
            "out_ptr": out}


def find_kernel(kernel_dir: str | Path, cc: int, *, S: int, params_dtype: str = "fp16", out_dtype: str = "fp32",
                HID: int = 64, N_HIDDEN: int = 3, OUT: int = 3, EXTRA: int = 0, kind: str = "spatial_mlp",  # noqa: N803
                ) -> Path:
    """Path of the metadata JSON in `kernel_dir` compiled for sm_<cc> matching the request."""
    index = load_index(kernel_dir)
    want = {"arch": f"sm_{cc}", "kind": kind}
    if kind == "spatial_mlp":
        want.update(S=S, params_dtype=params_dtype, out_dtype=out_dtype, HID=HID, N_HIDDEN=N_HIDDEN, OUT=OUT,
                    EXTRA=EXTRA)
    else:
        want.update(src_dtype=params_dtype)
    for e in index["kernels"]:
        if all(e.get(k) == v for k, v in want.items()):
            return Path(kernel_dir) / e["json"]
    have = sorted({e["arch"] for e in index["kernels"]})
    raise KernelError(f"{kernel_dir}: no compiled {kind} kernel for {want} (architectures there: {', '.join(have)}); "
                      f"run `asap compile-kernels --arch sm_{cc}`")
