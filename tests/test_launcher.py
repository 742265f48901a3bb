"""The driver-only launcher: argument packing against the AOT metadata, without a GPU."""

from __future__ import annotations

import ctypes

import pytest

from asap_deploy.errors import KernelError
from asap_deploy.plugins import launcher

FAKE = {
    "kernel_name": "k", "pointer_align": 16,
    "args": [{"name": "a_ptr", "type": "*fp16", "bytes": 8}, {"name": "n", "type": "i32", "bytes": 4},
             {"name": "out_ptr", "type": "*fp32", "bytes": 8}],
    "hidden_args": [{"name": "global_scratch", "type": "*i8", "value": 0},
                    {"name": "profile_scratch", "type": "*i8", "value": 0}],
    "grid_rule": {"S": 16, "programs_per_tile": 4}, "block": [128, 1, 1], "shared": 0,
}


def _read_back(packed):
    """Dereference the void** array exactly as cuLaunchKernel will."""
    vals = []
    for addr, v in zip(packed.pointers, packed.values):
        assert addr == ctypes.addressof(v)
        vals.append(type(v).from_address(addr).value)
    return vals


def test_pack_order_types_and_hidden_args():
    packed = launcher.pack_args(FAKE, {"out_ptr": 0x2000, "n": -7, "a_ptr": 0x1000})
    assert packed.names == ["a_ptr", "n", "out_ptr", "global_scratch", "profile_scratch"]
    assert packed.sizes() == [8, 4, 8, 8, 8]
    assert _read_back(packed) == [0x1000, -7, 0x2000, None, None]  # null scratch pointers
    assert packed.address == ctypes.addressof(packed.pointers)


def test_pack_rejects_bad_values():
    with pytest.raises(KernelError, match="missing \\['n'\\]"):
        launcher.pack_args(FAKE, {"a_ptr": 0x1000, "out_ptr": 0x2000})
    with pytest.raises(KernelError, match="unknown \\['m'\\]"):
        launcher.pack_args(FAKE, {"a_ptr": 0x1000, "out_ptr": 0x2000, "n": 1, "m": 2})
    with pytest.raises(KernelError, match="aligned"):
        launcher.pack_args(FAKE, {"a_ptr": 0x1004, "out_ptr": 0x2000, "n": 1})
    with pytest.raises(KernelError, match="int32"):
        launcher.pack_args(FAKE, {"a_ptr": 0x1000, "out_ptr": 0x2000, "n": 2**31})
    bad = dict(FAKE, args=[{"name": "x", "type": "bf16"}])
    with pytest.raises(KernelError, match="bf16"):
        launcher.pack_args(bad, {"x": 1})


def test_grid_rule():
    assert launcher.grid_for(FAKE, N=2, H=32, W=48) == (2 * 2 * 3 * 4, 1, 1)
    with pytest.raises(KernelError, match="multiple of S"):
        launcher.grid_for(FAKE, N=1, H=20, W=16)
    rep = {"kind": "repack", "grid_rule": {"BLOCK_T": 32, "BLOCK_C": 64}}
    assert launcher.grid_for(rep, n_tiles=33, P=14083) == (2, 221, 1)


def test_pack_against_compiled_metadata(tmp_path):
    """Pack the real kernel's arguments from its AOT metadata: one slot per PTX parameter, each of
    the PTX parameter's size, hidden scratch pointers last."""
    pytest.importorskip("triton")
    from asap_deploy.config import ModelConfig
    from asap_deploy.plugins import aot

    cfg = ModelConfig(label_nc=5, crop_size=256)
    v = aot.variants_for([cfg], params_dtypes=["fp16"], out_dtypes=["fp32"], block_p=64, iters=1)[0]
    aot.compile_variant(v, 80, tmp_path)
    meta = aot.load_metadata(tmp_path / f"{v.stem}_sm80.json")
    n, h, w, P = 2, 32, 48, cfg.num_params  # noqa: N806
    values = launcher.spatial_mlp_values(
        ids=0x10000, params=0x20000, out=0x30000, N=n, H=h, W=w, S=16, n_lab=5, dontcare_ch=-1,
        params_strides=(P * 6, 1, 3 * P, P), out_strides=(h * w * 3, w * 3, 3, 1))
    packed = launcher.pack_args(meta, values)
    assert packed.sizes() == [p["bytes"] for p in meta["ptx_params"]]
    got = dict(zip(packed.names, _read_back(packed)))
    assert got["params_ptr"] == 0x20000 and got["extra_ptr"] == 0x10000 and got["n_tiles_w"] == 3
    assert got["p_sc"] == 1 and got["o_sn"] == h * w * 3 and got["dontcare_ch"] == -1
    assert packed.names[-len(meta["hidden_args"]):] == [x["name"] for x in meta["hidden_args"]]
    assert launcher.grid_for(meta, N=n, H=h, W=w) == (n * 2 * 3 * 4, 1, 1)
    # the index lookup the TensorRT plugin uses
    aot.compile_kernels([80], tmp_path, [v], repack_dtypes=[])
    assert launcher.find_kernel(tmp_path, 80, S=16).name == f"{v.stem}_sm80.json"
    with pytest.raises(KernelError, match="sm_90"):
        launcher.find_kernel(tmp_path, 90, S=16)


def test_load_without_driver_is_a_clear_error(tmp_path):
    pytest.importorskip("cuda.bindings")
    try:
        from cuda.bindings import driver

        driver.cuInit(0)
        pytest.skip("a CUDA driver is present")
    except Exception:  # noqa: BLE001 - no driver: the case under test
        pass
    k = launcher.DriverKernel(FAKE, b"\0")
    with pytest.raises(KernelError, match="no CUDA driver"):
        k.load()
