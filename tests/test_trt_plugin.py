"""SpatialMLP plugin: kernel pack, field round trip through the creator, clone, type/format rules,
kernel choice per SM, launch arguments. The TensorRT parts run with tensorrt_rtx (no GPU needed)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from asap_deploy.errors import KernelError
from asap_deploy.plugins import plugin_core as core
from asap_deploy.plugins.plugin_core import KernelPack, PackedKernel

ATTRS = {"tile_size": 16, "label_count": 5, "pe_channels": 16, "depth": 3, "num_params": 675,
         "channels": [21, 16, 16, 3], "leaky_slope": 0.01}


def _fake_kernel(rng, cc: int, pd: str = "fp16", od: str = "fp16", target: str | None = None) -> PackedKernel:
    cubin = rng.integers(0, 256, int(rng.integers(100, 3000)), dtype=np.uint8).tobytes()
    ptx = f"// ptx sm_{cc} {rng.integers(1 << 30)}\n".encode()
    meta = {"cc": cc, "kernel_name": "asap_spatial_mlp", "ptx_target": target or f"sm_{cc}",
            "variant": {"params_dtype": pd, "out_dtype": od},
            "sha256": {"cubin": hashlib.sha256(cubin).hexdigest(), "ptx": hashlib.sha256(ptx).hexdigest()}}
    return PackedKernel(meta, cubin, ptx)


@pytest.fixture()
def pack():
    rng = np.random.default_rng(0)
    return KernelPack([_fake_kernel(rng, 80), _fake_kernel(rng, 86), _fake_kernel(rng, 86, "fp32", "fp32"),
                       _fake_kernel(rng, 90, target="sm_90a")])


def test_pack_round_trip_and_damage(pack):
    data = pack.to_bytes()
    back = KernelPack.from_bytes(data)
    assert [(k.meta, k.cubin, k.ptx) for k in back.kernels] == [(k.meta, k.cubin, k.ptx) for k in pack.kernels]
    assert back.to_bytes() == data
    assert KernelPack.from_bytes(b"").kernels == []
    bad = bytearray(data)
    bad[-5] ^= 0xFF  # inside the last image
    with pytest.raises(KernelError, match="does not match its recorded sha256"):
        KernelPack.from_bytes(bytes(bad))
    with pytest.raises(KernelError, match="bad magic"):
        KernelPack.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(KernelError, match="truncated"):
        KernelPack.from_bytes(data[:-10])


@pytest.mark.parametrize("cc,pd,want", [
    (86, "fp16", (86, "cubin")),    # exact
    (89, "fp16", (86, "cubin")),    # same major, older minor: binary compatible
    (87, "fp32", (86, "cubin")),
    (120, "fp16", (86, "ptx")),     # newer major: PTX JIT of the newest older target (not sm_90a)
    (90, "fp16", (90, "cubin")),
])
def test_select_kernel_for_sm(pack, cc, pd, want):
    k, how = pack.select(cc, pd, pd)
    assert (k.cc, how) == want and k.params_dtype == pd


def test_select_refuses_with_what_the_engine_holds(pack):
    with pytest.raises(KernelError, match=r"no kernel for this GPU \(sm_75.*holds sm_80, sm_86, sm_90.*--arch sm_75"):
        pack.select(75, "fp16", "fp16")
    with pytest.raises(KernelError, match="sm_80"):
        pack.select(80, "fp32", "fp32")  # only sm_86 has fp32, and 86 > 80


def test_attributes_checked():
    assert core.normalize_attributes(ATTRS)["channels"] == [21, 16, 16, 3]
    with pytest.raises(KernelError, match="missing field"):
        core.normalize_attributes({k: v for k, v in ATTRS.items() if k != "depth"})
    with pytest.raises(KernelError, match="label_count"):
        core.normalize_attributes({**ATTRS, "label_count": 6})
    with pytest.raises(KernelError, match="leaky_slope"):
        core.normalize_attributes({**ATTRS, "leaky_slope": 0.2})


@pytest.mark.parametrize("combo,ok", [
    (("int32", "fp32", "fp32"), True), (("int32", "fp16", "fp16"), True),
    (("int32", "fp16", "fp32"), False),  # output type = params type
    (("int8", "fp16", "fp16"), False), (("int32", "int32", "int32"), False), (("uint8", "fp32", "fp32"), False),
])
def test_supported_combinations(combo, ok):
    got = all(core.supported_combination(i, combo, [True] * 3) for i in range(3))
    assert got == ok
    assert not core.supported_combination(1, combo, [True, False, True])  # only LINEAR
    # with kernels packed, only their dtype pairs
    assert core.supported_combination(1, ("int32", "fp32", "fp32"), [True] * 3, [("fp16", "fp16")]) is False


def test_launch_values_match_kernel_arguments():
    from asap_deploy.plugins.launcher import pack_args

    n, h, w = 2, 48, 32
    vals = core.launch_values(0x1000, 0x2000, 0x3000, n, h, w, core.normalize_attributes(ATTRS))
    hs, ws, P = h // 16, w // 16, 675  # noqa: N806
    assert (vals["p_sn"], vals["p_sc"], vals["p_sy"], vals["p_sx"]) == (P * hs * ws, hs * ws, ws, 1)
    assert (vals["o_sn"], vals["o_sy"], vals["o_sx"], vals["o_sc"]) == (h * w * 3, w * 3, 3, 1)
    assert vals["dontcare_ch"] == -1 and vals["n_lab"] == 5 and vals["n_tiles_h"] == hs
    from asap_deploy.plugins.kernel import OUTPUT_ARGS, POINTER_ARGS, SCALAR_ARGS

    meta = {"kernel_name": "k", "pointer_align": 16, "hidden_args": [{"name": "g", "type": "*i8", "value": 0}],
            "args": [{"name": a, "type": "*fp16"} for a in POINTER_ARGS] + [{"name": a, "type": "i32"} for a in SCALAR_ARGS]
            + [{"name": a, "type": "*fp16"} for a in OUTPUT_ARGS]}
    packed = pack_args(meta, vals)
    assert packed.names[-1] == "g" and len(packed.values) == len(meta["args"]) + 1
    with pytest.raises(KernelError, match="not 16-byte aligned"):
        pack_args(meta, {**vals, "ids_ptr": 0x1004})


# ---- through TensorRT-RTX's Python plugin API ------------------------------------------------------
@pytest.fixture(scope="module")
def trt():
    """tensorrt_rtx for the tests below; without it they skip, and the tests above still run."""
    return pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")


_KEEP: list = []  # a PluginField holds a raw pointer to its array: keep the arrays alive


def _fields(trt, arrays):
    from asap_deploy.plugins.tensorrt import _field_type

    _KEEP.append(arrays)

    return trt.PluginFieldCollection([trt.PluginField(n, arrays[n], _field_type(trt, core.FIELDS[n][0]))
                                      for n in core.FIELD_NAMES])


def test_fields_round_trip_through_the_creator(trt, pack):
    from asap_deploy.plugins.tensorrt import fields_of, register

    creator = register(trt)
    assert creator is register(trt)  # idempotent
    reg = trt.get_plugin_registry().get_creator("SpatialMLP", "1", "asap")
    assert reg is not None
    arrays = core.field_arrays(ATTRS, pack)
    p1 = creator.create_plugin("spatial_mlp", _fields(trt, arrays), trt.TensorRTPhase.RUNTIME)
    f1 = fields_of(p1)
    assert list(f1) == list(core.FIELD_NAMES)
    for n in core.FIELD_NAMES:
        np.testing.assert_array_equal(f1[n], arrays[n], err_msg=n)
    # what TensorRT would store, read back by a fresh plugin: same attributes, same kernel images
    p2 = creator.create_plugin("spatial_mlp", _fields(trt, {k: v.copy() for k, v in f1.items()}), trt.TensorRTPhase.RUNTIME)
    assert p2.state.attrs == core.normalize_attributes(ATTRS)
    assert p2.state.pack.to_bytes() == pack.to_bytes()
    assert [k.cubin for k in p2.state.pack.kernels] == [k.cubin for k in pack.kernels]


def test_each_plugin_carries_its_own_kernels(trt, pack):
    """No hand-off through the creator: a plugin made from the node's attributes alone has no kernels
    in either phase; two instances given different packs (two builds in one process) each serialize
    their own, and so do their clones."""
    from asap_deploy.plugins.tensorrt import fields_of, register

    creator = register(trt)
    arrays = core.field_arrays(ATTRS, None)  # the ONNX node: attributes, no kernels
    a = creator.create_plugin("a", _fields(trt, arrays), trt.TensorRTPhase.BUILD)
    b = creator.create_plugin("b", _fields(trt, arrays), trt.TensorRTPhase.BUILD)
    rt = creator.create_plugin("n", _fields(trt, arrays), trt.TensorRTPhase.RUNTIME)
    assert fields_of(a)["kernels"].size == 0 and fields_of(rt)["kernels"].size == 0
    assert not hasattr(creator, "pending")
    other = KernelPack([pack.kernels[0]])
    a.set_kernels(pack)
    b.set_kernels(other.to_bytes())
    for plugin, want in ((a, pack), (b, other), (a.clone(), pack), (b.clone().clone(), other)):
        assert fields_of(plugin)["kernels"].view(np.uint8).tobytes() == want.to_bytes()
        assert plugin.state.pack.to_bytes() == want.to_bytes()
        assert fields_of(plugin)["tile_size"].tolist() == [ATTRS["tile_size"]]
    assert fields_of(rt)["kernels"].size == 0


def test_register_is_explicit_idempotent_and_thread_safe(trt):
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import threading
        import tensorrt_rtx as trt
        import asap_deploy.plugins.tensorrt as tp
        reg = trt.get_plugin_registry()
        assert reg.get_creator("SpatialMLP", "1", "asap") is None, "importing the module registered the plugin"
        got, start = [], threading.Barrier(8)
        def go():
            start.wait()
            got.append(tp.register(trt))
        threads = [threading.Thread(target=go) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(got) == 8 and all(c is got[0] for c in got)
        assert reg.get_creator("SpatialMLP", "1", "asap") is not None
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_clone_is_independent_and_complete(trt, pack):
    from asap_deploy.plugins.tensorrt import fields_of, register

    p = register(trt).create_plugin("n", _fields(trt, core.field_arrays(ATTRS, pack)), trt.TensorRTPhase.RUNTIME)
    c = p.clone()
    assert c is not p and c.state is not p.state and c.state.attrs == p.state.attrs
    assert (c.plugin_name, c.plugin_namespace, c.plugin_version, c.num_outputs) == ("SpatialMLP", "asap", "1", 1)
    c.state.attrs["tile_size"] = 99
    assert p.state.attrs["tile_size"] == 16
    cc = p.clone().clone()
    assert fields_of(cc)["kernels"].tobytes() == fields_of(p)["kernels"].tobytes()
    assert p.get_capability_interface(trt.PluginCapabilityType.BUILD) is p
    assert p.attach_to_context(None).state.pack_bytes == p.state.pack_bytes


def test_output_types_and_formats(trt, pack):
    from asap_deploy.plugins.tensorrt import register

    p = register(trt).create_plugin("n", _fields(trt, core.field_arrays(ATTRS, pack)), trt.TensorRTPhase.BUILD)
    for t in (trt.DataType.FLOAT, trt.DataType.HALF):
        assert p.get_output_data_types([trt.DataType.INT32, t]) == [t]

    def descs(*types, fmt=trt.TensorFormat.LINEAR):
        out = []
        for t in types:
            d, pd = trt.DynamicPluginTensorDesc(), trt.PluginTensorDesc()
            pd.type, pd.format = t, fmt
            d.desc = pd
            out.append(d)
        return out

    I32, F32, F16 = trt.DataType.INT32, trt.DataType.FLOAT, trt.DataType.HALF  # noqa: N806
    ok = descs(I32, F16, F16)
    assert all(p.supports_format_combination(i, ok, 2) for i in range(3))
    ok32 = descs(I32, F32, F32)  # the pack holds fp32 kernels for sm_86
    assert all(p.supports_format_combination(i, ok32, 2) for i in range(3))
    assert not p.supports_format_combination(2, descs(I32, F16, F32), 2)
    assert not p.supports_format_combination(0, descs(F32, F16, F16), 2)
    assert not p.supports_format_combination(1, descs(I32, F16, F16, fmt=trt.TensorFormat.CHW2), 2)
    fp16_only = register(trt).create_plugin(
        "n", _fields(trt, core.field_arrays(ATTRS, KernelPack([pack.kernels[1]]))), trt.TensorRTPhase.BUILD)
    assert not fp16_only.supports_format_combination(1, ok32, 2)
    json.dumps(fp16_only.state.attrs)  # plain python values


def test_configure_and_shape_change_refuse_params_that_do_not_fit_the_ids(trt, pack):
    """Build time (configure_plugin, profile ranges) and run time (on_shape_change, concrete shapes):
    params must be (N, P, H/S, W/S) for the ids, else TensorRT gets an error before enqueue."""
    from asap_deploy.plugins.tensorrt import register

    p = register(trt).create_plugin("n", _fields(trt, core.field_arrays(ATTRS, pack)), trt.TensorRTPhase.BUILD)
    P = ATTRS["num_params"]  # noqa: N806

    def dyn(lo, hi):
        d = trt.DynamicPluginTensorDesc()
        d.min, d.max = trt.Dims(lo), trt.Dims(hi)
        return d

    def desc(dims):
        d = trt.PluginTensorDesc()
        d.dims = trt.Dims(dims)
        return d

    p.configure_plugin([dyn((1, 16, 16), (2, 128, 96)), dyn((1, P, 1, 1), (2, P, 8, 6))], [dyn((1, 16, 16, 3), (2, 128, 96, 3))])
    with pytest.raises(KernelError, match="num_params"):
        p.configure_plugin([dyn((1, 16, 16), (2, 128, 96)), dyn((1, 7, 1, 1), (2, 7, 8, 6))], [dyn((1, 16, 16, 3), (2, 128, 96, 3))])
    p.on_shape_change([desc((2, 64, 32)), desc((2, P, 4, 2))], [desc((2, 64, 32, 3))])
    for params in ((2, P, 2, 2), (1, P, 4, 2), (2, P + 1, 4, 2)):
        with pytest.raises(KernelError, match="params"):
            p.on_shape_change([desc((2, 64, 32)), desc(params)], [desc((2, 64, 32, 3))])
