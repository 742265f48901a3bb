"""Loading and launching AOT kernels through the CUDA driver (plugins/launcher.py, the plugin's
enqueue in plugins/plugin_core.py) on CPU, with a fake driver module (tests/fake_cuda.py): the
checks made before anything reaches the driver, and how often modules are loaded."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from asap_deploy.errors import KernelError
from asap_deploy.plugins import cuda_driver, launcher
from asap_deploy.plugins.plugin_core import KernelPack, PackedKernel, SpatialMLPCore
from fake_cuda import FakeKernelDriver

ATTRS = {"tile_size": 16, "label_count": 5, "pe_channels": 16, "depth": 3, "num_params": 675,
         "channels": [21, 16, 16, 3], "leaky_slope": 0.01}


def kernel_meta(cc: int = 86, **over) -> dict:
    """Metadata of the shape aot.py writes (the launcher reads only what it launches with)."""
    from asap_deploy.plugins.kernel import OUTPUT_ARGS, POINTER_ARGS, SCALAR_ARGS

    meta = {"schema": 1, "kind": "spatial_mlp", "kernel_name": "asap_spatial_mlp", "arch": f"sm_{cc}", "cc": cc,
            "ptx_target": f"sm_{cc}", "ptx_version": "8.7", "cuda_version": "12.8", "triton_version": "3.6.0",
            "variant": {"params_dtype": "fp16", "out_dtype": "fp16"}, "num_warps": 4, "block": [128, 1, 1],
            "shared": 45056, "num_ctas": 1, "launch_pdl": False, "launch_cooperative_grid": False,
            "pointer_align": 16, "grid_rule": {"S": 16, "programs_per_tile": 1},
            "args": [{"name": a, "type": "*fp16", "bytes": 8} for a in POINTER_ARGS]
            + [{"name": a, "type": "i32", "bytes": 4} for a in SCALAR_ARGS]
            + [{"name": a, "type": "*fp16", "bytes": 8} for a in OUTPUT_ARGS],
            "hidden_args": [{"name": "global_scratch", "type": "*i8", "value": 0}]}
    meta.update(over)
    return meta


def packed(cc: int = 86, **over) -> PackedKernel:
    cubin = b"\x7fELF" + bytes([cc]) * 64
    ptx = f"//\n.version 8.7\n.target sm_{cc}\n.entry asap_spatial_mlp(\n)".encode()
    meta = kernel_meta(cc, **over)
    meta["sha256"] = {"cubin": hashlib.sha256(cubin).hexdigest(), "ptx": hashlib.sha256(ptx).hexdigest()}
    return PackedKernel(meta, cubin, ptx)


@pytest.fixture
def drv(monkeypatch):
    fake = FakeKernelDriver(cc=86)
    monkeypatch.setattr(cuda_driver, "driver", lambda: fake)
    monkeypatch.setattr(launcher, "driver", lambda: fake)
    return fake


def enqueue(core: SpatialMLPCore, n=1, h=32, w=32) -> str:
    return core.enqueue(0x10000, 0x20000, 0x30000, n, h, w, "fp16", "fp16", stream=0x77)


# ---- defect 7: the module cache key is taken after the context is bound ---------------------------
def test_plugin_loads_its_module_once_when_no_context_was_current(drv):
    core = SpatialMLPCore(ATTRS, pack=KernelPack([packed(86)]))
    assert not drv.current  # nothing current: the first load binds the device's primary context
    for _ in range(3):
        assert enqueue(core) == "cubin"
    assert len(drv.modules) == 1, f"the module was loaded {len(drv.modules)} times"
    assert len(drv.launches) == 3 and {launch[4] for launch in drv.launches} == {0x77}
    assert drv.modules[0] == core.pack.kernels[0].cubin


def test_plugin_loads_once_per_context(drv):
    core = SpatialMLPCore(ATTRS, pack=KernelPack([packed(86)]))
    enqueue(core)
    drv.cuCtxSetCurrent(0xD0)  # another context on this thread: its own module
    enqueue(core)
    enqueue(core)
    assert len(drv.modules) == 2
    box = []
    t = threading.Thread(target=lambda: box.append(enqueue(core)))  # a thread with no context: the primary one
    t.start()
    t.join(10)
    assert box == ["cubin"] and len(drv.modules) == 2  # the primary context's module is reused


# ---- defect 6: launch options the driver-only launcher does not implement are refused at load -----
@pytest.mark.parametrize("option,value", [("num_ctas", 2), ("launch_pdl", True), ("launch_cooperative_grid", True)])
def test_load_refuses_launch_options_it_cannot_honour(drv, option, value):
    k = launcher.DriverKernel(kernel_meta(86, **{option: value}), b"\x7fELF")
    with pytest.raises(KernelError, match=rf"{option}.*cuLaunchKernel"):
        k.load()
    assert "cuModuleLoadData" not in drv.calls  # refused before anything reaches the driver
    core = SpatialMLPCore(ATTRS, pack=KernelPack([packed(86, **{option: value})]))
    with pytest.raises(KernelError, match=option):
        enqueue(core)
    assert not drv.launches


def test_load_accepts_default_launch_options_and_older_metadata(drv):
    launcher.DriverKernel(kernel_meta(86), b"\x7fELF").load()
    old = {k: v for k, v in kernel_meta(86).items() if k not in ("num_ctas", "launch_pdl", "launch_cooperative_grid")}
    launcher.DriverKernel(old, b"\x7fELF").load()
    assert len(drv.modules) == 2


# ---- defect 5: ids, params and rgb must agree before the kernel runs -------------------------------
class _Desc:
    """A TensorRT PluginTensorDesc stand-in: .dims and .type."""

    def __init__(self, dims, type_="fp16"):
        self.dims, self.type = tuple(dims), type_


P = ATTRS["num_params"]


@pytest.mark.parametrize("params,out,message", [
    ((1, P, 2, 2), (1, 32, 32, 3), None),
    ((2, P, 2, 2), (1, 32, 32, 3), r"params has shape \(2, 675, 2, 2\).*\(1, 675, 2, 2\)"),  # N
    ((1, P, 1, 2), (1, 32, 32, 3), r"\(1, 675, 2, 2\)"),  # H/S smaller: the kernel would read past it
    ((1, P, 2, 4), (1, 32, 32, 3), r"\(1, 675, 2, 2\)"),  # W/S
    ((1, P - 1, 2, 2), (1, 32, 32, 3), "num_params"),     # P
    ((1, P, 2, 2), (1, 32, 16, 3), r"rgb has shape \(1, 32, 16, 3\)"),
    ((1, P, 2), (1, 32, 32, 3), "ranks 3 and 3"),
])
def test_enqueue_refuses_params_that_do_not_fit_the_ids(drv, params, out, message):
    core = SpatialMLPCore(ATTRS, pack=KernelPack([packed(86)]))
    call = lambda: core_enqueue_from_descs(core, (1, 32, 32), params, out)  # noqa: E731
    if message is None:
        assert call() == "cubin" and len(drv.launches) == 1
        return
    with pytest.raises(KernelError, match=message):
        call()
    assert not drv.launches and "cuModuleLoadData" not in drv.calls  # refused before the driver


def core_enqueue_from_descs(core, ids, params, out):
    from asap_deploy.plugins.plugin_core import enqueue_from_descs

    return enqueue_from_descs(core, [_Desc(ids, "int32"), _Desc(params)], [_Desc(out)], [0x10000, 0x20000],
                              [0x30000], 0x77, lambda t: t)


def test_shape_ranges_refused_at_build_time():
    from asap_deploy.plugins.plugin_core import check_shape_ranges, normalize_attributes

    a = normalize_attributes(ATTRS)
    check_shape_ranges(((1, 16, 16), (4, 256, 128)), ((1, P, 1, 1), (4, P, 16, 8)), a)  # the build's own profile
    with pytest.raises(KernelError, match="num_params = 675"):
        check_shape_ranges(((1, 16, 16), (4, 256, 128)), ((1, 1, 1, 1), (4, P, 16, 8)), a)
    with pytest.raises(KernelError, match=r"ids H range 16..256 cannot match its params range 32..64"):
        check_shape_ranges(((1, 16, 16), (4, 256, 128)), ((1, P, 32, 1), (4, P, 64, 8)), a)
    with pytest.raises(KernelError, match="ranks"):
        check_shape_ranges(((1, 16), (4, 256)), ((1, P, 1, 1), (4, P, 16, 8)), a)


# ---- defect 4: the driver's CUDA version against the PTX ISA / ptxas a kernel was made with --------
@pytest.mark.parametrize("image,ptx_isa,cuda,driver_cuda,needs", [
    ("ptx", "9.4", "13.4", 13000, "13.4"),    # Triton 3.9's sm_90 PTX on the H200's CUDA 13.0 driver
    ("ptx", "8.8", "12.9", 12080, "12.9"),
    ("ptx", "9.0", "13.0", 13000, None),
    ("ptx", "8.7", "12.8", 12080, None),
    ("cubin", "9.4", "13.4", 12090, "13"),    # a CUDA 13 cubin on a CUDA 12 driver
    ("cubin", "9.4", "13.4", 13000, None),    # same major: minor-version compatibility
    ("cubin", "8.7", "12.8", 13000, None),
    ("cubin", "8.8", None, 12080, None),      # older metadata: the PTX ISA's CUDA major
    ("ptx", "8.8", None, 12080, "12.9"),
])
def test_load_checks_the_driver_cuda_version(drv, image, ptx_isa, cuda, driver_cuda, needs):
    drv.cuda_version = driver_cuda
    meta = kernel_meta(86, ptx_version=ptx_isa, cuda_version=cuda)
    data = b"\x7fELF" + b"\0" * 16 if image == "cubin" else f".version {ptx_isa}\n.target sm_86\n\0".encode()
    k = launcher.DriverKernel(meta, data)
    if needs is None:
        k.load()
        assert len(drv.modules) == 1
        return
    have = f"{driver_cuda // 1000}.{driver_cuda % 1000 // 10}"
    with pytest.raises(KernelError) as info:
        k.load()
    msg = str(info.value)
    assert f"CUDA {have}" in msg and needs in msg and "Triton" in msg and "GPU host" in msg, msg
    assert "cuModuleLoadData" not in drv.calls  # refused before the driver sees the image


def test_plugin_refuses_ptx_jit_on_an_older_driver_naming_the_fix(drv):
    drv.cc, drv.cuda_version = 90, 13000  # H200, driver 580 (CUDA 13.0)
    core = SpatialMLPCore(ATTRS, pack=KernelPack([packed(80, ptx_version="9.4", cuda_version="13.4")]))
    with pytest.raises(KernelError, match=r"PTX ISA 9.4.*CUDA >= 13.4.*this driver supports CUDA 13.0"):
        enqueue(core)  # no sm_90 cubin: the sm_80 PTX would be JIT-compiled by the driver
    assert not drv.modules
    ok = SpatialMLPCore(ATTRS, pack=KernelPack([packed(90, ptx_version="9.4", cuda_version="13.4")]))
    assert enqueue(ok) == "cubin" and len(drv.modules) == 1


# ---- defect 3: shared memory against the device's opt-in limit, at load ------------------------------
def test_load_refuses_a_kernel_needing_more_shared_memory_than_the_device_allows(drv):
    drv.smem_optin = 101376  # sm_86 / sm_89: 99 KiB per block
    k = launcher.DriverKernel(kernel_meta(86, shared=151552), b"\x7fELF")
    with pytest.raises(KernelError, match=r"needs 151,552 bytes of shared memory per block.*allows 101,376"):
        k.load()
    assert "cuModuleLoadData" not in drv.calls and not drv.func_attrs
    ok = launcher.DriverKernel(kernel_meta(86, shared=101376), b"\x7fELF").load()  # exactly the limit: opts in
    assert drv.func_attrs == [(ok._function, "max_dyn_smem", 101376)]
    small = launcher.DriverKernel(kernel_meta(86, shared=48 * 1024), b"\x7fELF").load()  # no opt-in needed
    assert len(drv.func_attrs) == 1 and small._function is not None



def test_static_shared_memory_counts_toward_the_limit(drv):
    """The driver's limit is on static + dynamic shared memory (ptxas 13 gives sm_90 kernels 1 KiB of
    static shared memory): checked from the metadata before loading and from cuFuncGetAttribute
    after; a kernel at 48 KiB dynamic + 1 KiB static still opts in."""
    drv.smem_optin = 101376
    meta = kernel_meta(90, shared=101376, static_shared=1024)
    with pytest.raises(KernelError, match=r"needs 102,400 bytes .*\(101,376 dynamic \+ 1,024 static\).*allows 101,376"):
        launcher.DriverKernel(meta, b"\x7fELF").load()
    assert "cuModuleLoadData" not in drv.calls
    drv.static_smem = 1024  # metadata without the figure: the driver's, after loading (the module is unloaded)
    with pytest.raises(KernelError, match="1,024 static"):
        launcher.DriverKernel(kernel_meta(90, shared=101376), b"\x7fELF").load()
    assert drv.calls[-1] == "cuModuleUnload"
    k = launcher.DriverKernel(kernel_meta(90, shared=48 * 1024, static_shared=1024), b"\x7fELF").load()
    assert drv.func_attrs == [(k._function, "max_dyn_smem", 48 * 1024)]
