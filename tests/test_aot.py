"""Ahead-of-time compilation for CUDA architectures on a machine without a GPU."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from asap_deploy.config import ModelConfig, preset  # noqa: E402
from asap_deploy.errors import KernelError, UsageError  # noqa: E402
from asap_deploy.plugins import aot  # noqa: E402
from asap_deploy.plugins.kernel import CONSTEXPR_ARGS, OUTPUT_ARGS, POINTER_ARGS, SCALAR_ARGS  # noqa: E402

SMALL = ModelConfig(label_nc=5, crop_size=256)  # S=16: quick to compile


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    variants = aot.variants_for([SMALL], params_dtypes=["fp16"], out_dtypes=["fp32"], block_p=64, iters=1)
    index = aot.compile_kernels(aot.parse_archs("sm_80,sm_86,sm_89,sm_90"), out, variants,
                                repack_dtypes=["fp32"])
    return out, index


def test_every_listed_arch_compiles(compiled):
    out, index = compiled
    archs = {e["arch"] for e in index["kernels"]}
    assert archs == {"sm_80", "sm_86", "sm_89", "sm_90"}
    assert len(index["kernels"]) == 8  # one fused + one re-pack per arch
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == json.loads(json.dumps(index))
    for e in index["kernels"]:
        meta = aot.load_metadata(out / e["json"])
        cubin = (out / meta["files"]["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF", "a cubin is an ELF image"
        ptx = (out / meta["files"]["ptx"]).read_text()
        assert f".entry {meta['kernel_name']}(" in ptx
        assert meta["ptx_target"].startswith(meta["arch"]), (meta["ptx_target"], meta["arch"])


def test_metadata_describes_the_launch(compiled):
    out, index = compiled
    import triton

    e = next(e for e in index["kernels"] if e["kind"] == "spatial_mlp" and e["arch"] == "sm_86")
    meta = aot.load_metadata(out / e["json"])
    assert meta["kernel_name"] == "asap_spatial_mlp"
    assert meta["triton_version"] == triton.__version__ == index["triton_version"]
    assert [a["name"] for a in meta["args"]] == [*POINTER_ARGS, *SCALAR_ARGS, *OUTPUT_ARGS]
    assert [a["type"] for a in meta["args"]][:3] == ["*i32", "*fp16", "*fp32"]
    assert set(meta["constexprs"]) == set(CONSTEXPR_ARGS)
    assert meta["constexprs"]["S"] == 16 and meta["constexprs"]["OUT_U8"] == 0
    # Triton 3.x appends hidden scratch pointers; the PTX entry has exactly args + hidden params
    assert all(h["type"] == "*i8" and h["value"] == 0 for h in meta["hidden_args"])
    assert len(meta["ptx_params"]) == len(meta["args"]) + len(meta["hidden_args"])
    assert meta["block"] == [meta["num_warps"] * 32, 1, 1]
    assert 0 < meta["shared"] <= 227 * 1024
    rule = meta["grid_rule"]
    assert rule["S"] * rule["S"] == rule["programs_per_tile"] * rule["pixels_per_program"]
    import hashlib

    assert hashlib.sha256((out / meta["files"]["cubin"]).read_bytes()).hexdigest() == meta["sha256"]["cubin"]


def test_ptx_entry_params_parser():
    ptx = """.visible .entry k(
        .param .u64 .ptr .global .align 1 k_param_0,
        .param .u32 k_param_1,
        .param .u64 k_param_2
    )
    .reqntid 128
    {"""
    params = aot.ptx_entry_params(ptx, "k")
    assert [(p["bytes"], p["pointer"]) for p in params] == [(8, True), (4, False), (8, False)]
    with pytest.raises(KernelError, match="no entry"):
        aot.ptx_entry_params(ptx, "other")


def test_parse_archs():
    assert aot.parse_archs("sm_80,sm_86, sm_89,sm_90") == [80, 86, 89, 90]
    assert aot.parse_archs(["90", "sm_80", "8.6", "sm_80"]) == [90, 80, 86]
    for bad in ("sm_xx", "compute_80", ""):
        with pytest.raises(UsageError):
            aot.parse_archs(bad)
    with pytest.raises(UsageError, match="too old"):
        aot.parse_archs("sm_70")


def test_variants_and_bad_dtypes():
    vs = aot.variants_for([preset("facades"), preset("cityscapes")], params_dtypes=["fp16", "fp32"],
                          out_dtypes=["fp32"])
    assert {(v.spec.S, v.params_dtype) for v in vs} == {(64, "fp16"), (64, "fp32"), (16, "fp16"), (16, "fp32")}
    assert len({v.stem for v in vs}) == len(vs)
    with pytest.raises(UsageError, match="bf16"):
        aot.variants_for([SMALL], params_dtypes=["bf16"])
    with pytest.raises(UsageError, match="int8"):
        aot.variants_for([SMALL], out_dtypes=["int8"])


def test_load_metadata_rejects_other_schemas(tmp_path):
    p = tmp_path / "k.json"
    p.write_text(json.dumps({"schema": 999}))
    with pytest.raises(KernelError, match="schema"):
        aot.load_metadata(p)
    p.write_text("{not json")
    with pytest.raises(KernelError, match="cannot read"):
        aot.load_metadata(p)


@pytest.mark.slow
def test_default_variants_compile_for_sm90(tmp_path):
    """The published config (S=64, facades) with the default block sizes, every dtype variant."""
    vs = aot.variants_for([preset("facades")], params_dtypes=["fp16", "fp32"], out_dtypes=["fp32", "fp16", "u8"])
    index = aot.compile_kernels([90], tmp_path, vs, repack_dtypes=["fp16"])
    assert len(index["kernels"]) == 7


def test_metadata_records_ptx_isa_and_cuda_version(compiled):
    """What the driver at load compares with (issue 15, defect 4): the PTX ISA of the .ptx and the
    CUDA release of the ptxas that made the cubin, per architecture (Triton may use a different
    ptxas per architecture)."""
    from triton.backends.nvidia.compiler import get_ptxas

    from asap_deploy.plugins import cuda_driver

    out, index = compiled
    for e in index["kernels"]:
        meta = aot.load_metadata(out / e["json"])
        ptx = (out / meta["files"]["ptx"]).read_text()
        assert f".version {meta['ptx_version']}\n" in ptx
        assert meta["cuda_version"] == get_ptxas(meta["cc"]).version  # this Triton's ptxas for that arch
        need = cuda_driver.min_cuda_for_ptx(meta["ptx_version"])
        assert need <= cuda_driver.parse_cuda_version(meta["cuda_version"])  # a ptxas reads its own ISA
    bad = aot.load_metadata(out / index["kernels"][0]["json"])
    with pytest.raises(KernelError, match="cuda_version"):
        aot.check_metadata(dict(bad, cuda_version=13.4), "x.json")


# ---- issue 15, defect 3: shared memory per block against the target's opt-in limit ----------------
MID = ModelConfig(label_nc=5, crop_size=256, hr_width=32, hr_depth=4)  # 10 KiB of shared memory, 6 KiB re-reading


def test_shared_memory_limits_per_architecture():
    assert aot.shared_limit(86) == aot.shared_limit(89) == aot.shared_limit(120) == 101376  # 99 KiB
    assert aot.shared_limit(80) == aot.shared_limit(87) == 166912  # 163 KiB
    assert aot.shared_limit(90) == aot.shared_limit(100) == 232448  # 227 KiB
    assert aot.shared_limit(75) == 65536
    assert aot.shared_limit(85) == 99 * 1024  # unknown: the smallest of its major


def test_compile_picks_the_reload_variant_or_refuses_naming_the_limit(tmp_path, monkeypatch):
    (v,) = aot.variants_for([MID], params_dtypes=["fp16"], out_dtypes=["fp32"], block_p=64, iters=1)
    full = aot.compile_variant(v, 86, tmp_path / "a")
    assert full["constexprs"]["RELOAD"] == 0 and full["shared_limit"] == 101376
    monkeypatch.setitem(aot.MAX_SHARED_OPTIN, 86, full["shared"] - 1)  # the full kernel no longer fits
    index = aot.compile_kernels([86], tmp_path / "b", [v], repack_dtypes=[])
    (e,) = index["kernels"]
    meta = aot.load_metadata(tmp_path / "b" / e["json"])
    assert e["RELOAD"] and meta["constexprs"]["RELOAD"] == 1 and e["json"] == f"{v.with_reload().stem}_sm86.json"
    assert meta["shared"] < full["shared"] and meta["shared"] <= aot.MAX_SHARED_OPTIN[86]
    aot.check_variant(meta, v.with_reload(), 86)
    monkeypatch.setitem(aot.MAX_SHARED_OPTIN, 86, meta["shared"] - 1)  # neither fits
    with pytest.raises(KernelError, match=rf"needs {full['shared']:,} bytes .* / {meta['shared']:,} bytes .*re-reading"
                                          rf".*sm_86, which allows at most {meta['shared'] - 1:,} bytes"):
        aot.compile_variant(v, 86, tmp_path / "c")


@pytest.mark.slow
@pytest.mark.parametrize("depth", [5, 6])
def test_hr_width_128_fits_sm86_by_reloading_and_sm90_as_is(tmp_path, depth):
    """The numbers of the issue: hr_width=128, depth 5/6 need 118,784 / 151,552 bytes (more than
    sm_86/89's 99 KiB); the compiler picks the re-reading variant there, and the full one on sm_90."""
    cfg = ModelConfig(label_nc=13, crop_size=256, hr_width=128, hr_depth=depth)
    (v,) = aot.variants_for([cfg], params_dtypes=["fp16"], out_dtypes=["fp32"])
    m86 = aot.compile_variant(v, 86, tmp_path)
    assert m86["constexprs"]["RELOAD"] == 1 and m86["shared"] <= 101376
    m90 = aot.compile_variant(v, 90, tmp_path)
    assert m90["constexprs"]["RELOAD"] == 0 and 101376 < m90["shared"] <= 232448


# ---- issue 15, defect 9: registers / spills / shared memory / occupancy without a GPU ----------------
def test_occupancy_follows_the_calculator_rules():
    # sm_80, 255 registers x 128 threads: 8192 registers per warp (256-unit rounding) -> 8 warps = 2 blocks
    o = aot.occupancy(80, 255, 45056, 128)
    assert (o["blocks_per_sm"], o["warps_per_sm"], o["limited_by"]) == (2, 8, "registers")
    assert o["occupancy"] == 8 / 64
    # shared memory decides: 163 KiB + 1 KiB reserved per block leaves one block of an sm_80's 164 KiB
    assert aot.occupancy(80, 64, 163 * 1024, 128)["blocks_per_sm"] == 1
    assert aot.occupancy(86, 64, 30 * 1024, 128) == {"blocks_per_sm": 3, "warps_per_sm": 12, "max_warps_per_sm": 48,
                                                     "occupancy": 0.25, "limited_by": "shared memory"}
    assert aot.occupancy(80, 24, 0, 128)["limited_by"] == "threads"  # 16 blocks of 4 warps fill 64 warps
    assert aot.occupancy(61, 32, 0, 128) == {}


def test_kernel_resources_read_from_the_compiled_kernel(compiled):
    out, index = compiled
    e = next(e for e in index["kernels"] if e["kind"] == "spatial_mlp" and e["arch"] == "sm_90")
    meta, cubin, ptx = aot.load_kernel(out, e)
    r = aot.kernel_resources(meta, cubin, ptx)
    assert r["same_cubin"], "ptxas -v with Triton's options must reproduce the shipped cubin"
    assert r["registers"] == aot.ptxas_report(ptx.decode(), meta["ptx_target"], 90)["registers"]
    assert 16 <= r["registers"] <= 255 and r["shared_bytes"] == meta["shared"] and r["ptx_target"] == "sm_90a"
    assert r["blocks_per_sm"] == aot.occupancy(90, r["registers"], meta["shared"], 128)["blocks_per_sm"] >= 1
    assert aot.cubin_info(b"not an elf", "k") == {}
    assert aot.cubin_info(cubin, meta["kernel_name"])["registers"] == r["registers"]
