"""`asap build-engine` with TensorRT-RTX on CPU (ahead-of-time build): engines that carry the
SpatialMLP plugin and its kernels, sidecars, refusal of tampered/mismatched engines by the runner,
profile parsing, and the TensorRT-RTX parser library workaround (in subprocesses)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from asap_deploy.config import ModelConfig
from asap_deploy.engines import build as eb
from asap_deploy.errors import EngineError, UsageError
from asap_deploy.export.bundle import export_model, load_bundle
from asap_deploy.random_model import random_generator
from asap_deploy.io import MARKER
from asap_deploy.plugins import cuda_driver, trt_compat
from asap_deploy.plugins.plugin_core import KernelPack

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, instance_edges=True, crop_size=256, learned_ds_factor=8,
                  lr_width=8, lr_max_width=8, lr_depth=1, hr_width=16, hr_depth=3)  # S=16, tiny MLP
SHAPES = ["--min", "1x16x16", "--opt", "1x64x64", "--max", "2x128x96"]


@pytest.fixture(scope="module")
def trt():
    """tensorrt_rtx for the tests that build or parse; without it they skip, and the tests that need
    no TensorRT (shape parsing, profiles, the library workaround on fake files) still run."""
    return pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")


@pytest.fixture(scope="module")
def built(trt, tmp_path_factory, kernel_cache):
    """A random bundle and its fp16 rtx engines for sm_86, built through the CLI."""
    from asap_deploy.cli import app

    path = export_model(random_generator(CFG, 3), tmp_path_factory.mktemp("trt") / "bundle").path
    res = CliRunner().invoke(app, ["build-engine", str(path), "--fp16", "--flavor", "rtx", "--arch", "sm_86",
                                   "--stage", "all", *SHAPES])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output
    return load_bundle(path)


def _pack_in(engine: bytes) -> KernelPack:
    """The kernel pack the plugin serialized into the engine, found by its magic."""
    i = engine.find(b"ASAPKPK1")
    assert i >= 0, "no kernel pack in the engine"
    (n,) = struct.unpack("<I", engine[i + 8:i + 12])
    header = json.loads(engine[i + 12:i + 12 + n])
    end = i + 12 + n + sum(e["cubin"][1] + e["ptx"][1] for e in header["kernels"])
    return KernelPack.from_bytes(engine[i:end])  # checks every image against its sha256


def test_engines_sidecars_and_plugin_fields(trt, built):
    files = sorted(p.name for p in built.path.iterdir())
    for g in ("predictor", "pixelwise", "asap"):
        assert f"{g}.fp16.rtx.engine" in files and f"{g}.fp16.rtx.engine.json" in files
    assert "timing.rtx.cache" not in files  # timing caches are no-ops in TensorRT-RTX (full TensorRT: kept)
    assert not [f for f in files if f.startswith(".") and f != MARKER], f"temporary files left: {files}"
    for g in ("pixelwise", "asap"):
        eng = (built.path / f"{g}.fp16.rtx.engine").read_bytes()
        sc = eb.read_sidecar(built.path / f"{g}.fp16.rtx.engine")
        assert sc["engine"]["sha256"] == eb.sha256_bytes(eng)
        assert sc["source_onnx"] == {"file": f"{g}.fp16.onnx", "sha256": built.manifest["files"][f"{g}.fp16.onnx"]["sha256"]}
        assert sc["tensorrt"] == {"flavor": "rtx", "module": "tensorrt_rtx", "version": trt.__version__}
        assert sc["targets"]["sm"] == [86] and sc["precision"] == "fp16" and sc["strongly_typed"]
        assert "strongly typed" in sc["fp16_method"] and sc["timing_cache"] is None
        assert sc["profile"]["labels_NHW"] == {"min": [1, 16, 16], "opt": [1, 64, 64], "max": [2, 128, 96]}
        assert sc["profile"]["inputs"]["labels"]["max"] == [2, 128, 96]
        pl = sc["plugin"]
        assert (pl["name"], pl["namespace"], pl["version"], pl["kernel_archs"]) == ("SpatialMLP", "asap", "1", [86])
        assert pl["layers"] == ["spatial_mlp"]
        assert b"SpatialMLP" in eng
        pack = _pack_in(eng)
        assert eb.sha256_bytes(pack.to_bytes()) == pl["kernel_pack_sha256"]
        (k,) = pack.kernels
        assert (k.cc, k.params_dtype, k.out_dtype) == (86, "fp16", "fp16")
        assert k.meta["constexprs"]["S"] == 16 and k.meta["constexprs"]["HID"] == 16 and k.cubin[:4] == b"\x7fELF"
    if "params" in sc["profile"]["inputs"]:
        assert sc["profile"]["inputs"]["params"]["max"] == [2, CFG.num_params, 8, 6]
    pred = eb.read_sidecar(built.path / "predictor.fp16.rtx.engine")
    assert pred["plugin"] is None and b"ASAPKPK1" not in (built.path / "predictor.fp16.rtx.engine").read_bytes()
    assert pred["profile"]["inputs"]["instances"]["min"] == [1, 16, 16]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plugin_output_shapes_and_types_for_dynamic_inputs(trt, built, precision):
    """The parser calls the plugin's get_output_data_types/get_output_shapes on dynamic inputs."""
    from asap_deploy.plugins import tensorrt as tp

    trt_compat.ensure_rtx_parser_lib()
    tp.register(trt)
    logger = trt.Logger(trt.Logger.ERROR)
    net = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(net, logger)
    assert parser.parse_from_file(str(built.file("pixelwise", precision)))
    (layer,) = [net.get_layer(i) for i in range(net.num_layers) if net.get_layer(i).type == trt.LayerType.PLUGIN_V3]
    out = layer.get_output(0)
    assert tuple(out.shape) == (-1, -1, -1, CFG.output_nc)
    assert out.dtype == (trt.DataType.HALF if precision == "fp16" else trt.DataType.FLOAT)
    assert layer.get_input(0).dtype == trt.DataType.INT32


def test_kernels_are_cached_and_fp32_build(built, tmp_path):
    msgs = []
    out = eb.build_engines(built, eb.BuildOptions(flavor="rtx", stage="pixelwise", archs=[86], out_dir=tmp_path,
                                                  profile=eb.make_profile(16, "1x16x16", "1x32x32", "1x64x64")),
                           progress=msgs.append)
    assert any("compiling" in m for m in msgs)  # fp32 kernels: not in the cache yet
    assert out[0].sidecar["precision"] == "fp32" and out[0].sidecar["fp16_method"] is None
    assert _pack_in(out[0].path.read_bytes()).dtypes() == [("fp32", "fp32")]
    msgs.clear()
    eb.build_engines(built, eb.BuildOptions(flavor="rtx", stage="pixelwise", fp16=True, archs=[86], out_dir=tmp_path,
                                            profile=eb.make_profile(16, "1x16x16", "1x32x32", "1x64x64")),
                     progress=msgs.append)
    assert not any("compiling" in m for m in msgs), msgs  # fp16 kernels come from the cache


def _copy_engine(built, tmp_path, graph="asap"):
    for suffix in ("", ".json"):
        shutil.copy(built.path / f"{graph}.fp16.rtx.engine{suffix}", tmp_path / f"{graph}.fp16.rtx.engine{suffix}")
    return tmp_path / f"{graph}.fp16.rtx.engine"


def _open(built, folder):
    from asap_deploy.engines.tensorrt import TensorRTEngine

    return TensorRTEngine(built, "fp16", flavor="rtx", engine_dir=folder, graphs=("asap",))


def test_sigint_mid_build_leaves_whole_engine_sidecar_pairs_only(built, tmp_path, kernel_cache):
    """Ctrl-C as the 2nd engine is about to be written: exit 130, no temp file; the engine built
    before it is whole with its sidecar, the interrupted one absent (a runner refuses a lone file)."""
    hook = ("import os, signal\nimport asap_deploy.engines.build as eb\n_real, _n = eb.atomic_path, [0]\n"
            "def ap(path, *a, **k):\n"
            "    if str(path).endswith('.engine'):\n"
            "        _n[0] += 1\n"
            "        if _n[0] == 2: os.kill(os.getpid(), signal.SIGINT)\n"
            "    return _real(path, *a, **k)\n"
            "eb.atomic_path = ap\n")
    argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{hook}\n"
            "sys.argv = ['asap'] + sys.argv[1:]\nfrom asap_deploy.cli import app\napp()\n",
            "build-engine", str(built.path), "--fp16", "--flavor", "rtx", "--arch", "sm_86", "--stage", "all",
            "-o", str(tmp_path / "e"), *SHAPES]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "ASAP_KERNEL_CACHE": str(kernel_cache)})
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "e").iterdir())
    assert not [f for f in files if f.startswith(".") and f != MARKER], files
    engines = [f for f in files if f.endswith(".engine")]
    assert len(engines) == 1, files
    sidecar = json.loads((tmp_path / "e" / (engines[0] + ".json")).read_text())
    blob = (tmp_path / "e" / engines[0]).read_bytes()
    assert sidecar["engine"]["sha256"] == hashlib.sha256(blob).hexdigest()


def test_runner_refuses_tampered_engine(built, tmp_path):
    eng = _copy_engine(built, tmp_path)
    data = bytearray(eng.read_bytes())
    data[len(data) // 2] ^= 0x01
    eng.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"sha256 does not match the sidecar.*asap build-engine .* --stage end-to-end "
                                          r"--flavor rtx --fp16"):
        _open(built, tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda sc: sc["tensorrt"].update(version="1.6.0.0"), r"built with tensorrt_rtx 1\.6\.0\.0, installed is"),
    (lambda sc: sc["plugin"].update(version="0"), "plugin is version 0, this asap-deploy has version 1"),
    (lambda sc: sc["source_onnx"].update(sha256="0" * 64), "re-exported since"),
    (lambda sc: sc["tensorrt"].update(flavor="tensorrt"), "this runner uses rtx"),
    (lambda sc: sc.update(schema_version=99), "not an asap-deploy engine sidecar"),
])
def test_runner_refuses_mismatched_sidecar(built, tmp_path, edit, message):
    eng = _copy_engine(built, tmp_path)
    sc_path = eb.sidecar_path(eng)
    sc = json.loads(sc_path.read_text())
    edit(sc)
    sc_path.write_text(json.dumps(sc))
    with pytest.raises(EngineError, match=message):
        _open(built, tmp_path)


def test_runner_missing_engine_or_sidecar(built, tmp_path):
    with pytest.raises(EngineError, match="no fp16 rtx engine for the asap graph; build it with: asap build-engine"):
        _open(built, tmp_path)
    eng = _copy_engine(built, tmp_path)
    eb.sidecar_path(eng).unlink()
    with pytest.raises(EngineError, match="has no sidecar"):
        _open(built, tmp_path)


def test_sidecar_gpu_check_names_the_arch(built):
    sc = eb.read_sidecar(built.path / "asap.fp16.rtx.engine")
    eb.check_sidecar(sc, sm=86)
    with pytest.raises(EngineError, match=r"built for sm_86, this GPU is sm_89.*--arch sm_89"):
        eb.check_sidecar(sc, sm=89)


def test_sidecar_records_the_kernels_and_refuses_a_driver_that_cannot_load_them(built):
    """Issue 15, defect 4: the sidecar lists the plugin's kernels with their PTX ISA and ptxas CUDA
    release; the runner (check_sidecar with the driver's version) refuses an engine whose kernel for
    this GPU the driver cannot load, saying how to fix it, before any TensorRT object exists."""
    from asap_deploy.plugins import cuda_driver as cd

    sc = eb.read_sidecar(built.path / "asap.fp16.rtx.engine")
    (k,) = sc["plugin"]["kernels"]
    assert (k["arch"], k["params_dtype"], k["out_dtype"]) == ("sm_86", "fp16", "fp16")
    pack = _pack_in((built.path / "asap.fp16.rtx.engine").read_bytes())
    assert (k["ptx_version"], k["cuda_version"]) == (pack.kernels[0].meta["ptx_version"], pack.kernels[0].meta["cuda_version"])
    made = cd.parse_cuda_version(k["cuda_version"])
    eb.check_sidecar(sc, sm=86, driver_cuda=(made[0], 0))  # minor-version compatibility: the cubin loads
    with pytest.raises(EngineError, match=rf"asap.fp16.rtx.engine: .*cubin needs a driver for CUDA {made[0]}.x.*GPU host"):
        eb.check_sidecar(sc, sm=86, driver_cuda=(made[0] - 1, 9))
    need = cd.min_cuda_for_ptx(k["ptx_version"])  # an sm_90 GPU would JIT the sm_86 PTX
    eb.check_plugin_kernels(sc, 90, need)
    older = (need[0], need[1] - 1) if need[1] else (need[0] - 1, 9)
    with pytest.raises(EngineError, match=rf"PTX \(ISA {k['ptx_version']}\).*Triton"):
        eb.check_plugin_kernels(sc, 90, older)
    # defect 3: the kernel's shared memory against the GPU's opt-in limit per block
    eb.check_sidecar(sc, sm=86, shared_optin=k["shared"])
    with pytest.raises(EngineError, match=rf"needs {k['shared']:,} bytes of shared memory per block.*allows"):
        eb.check_sidecar(sc, sm=86, shared_optin=k["shared"] - 1)
    old = dict(sc, plugin={kk: v for kk, v in sc["plugin"].items() if kk != "kernels"})
    eb.check_sidecar(old, sm=86, driver_cuda=(1, 0))  # an older sidecar: checked when the kernel loads


def test_runner_checks_the_gpu_before_any_tensorrt_object(built):
    n, why = cuda_driver.cuda_device_count()
    if n:
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(trt_compat.TrtUnavailable, match="needs an NVIDIA GPU with its driver"):
        _open(built, built.path)


def test_cli_errors(built):
    from asap_deploy.cli import app

    r = CliRunner()
    if importlib_missing("tensorrt"):
        res = r.invoke(app, ["build-engine", str(built.path), "--flavor", "tensorrt"])
        assert res.exit_code == 6 and "pip install 'asap-deploy[tensorrt]'" in " ".join(res.output.split())
    res = r.invoke(app, ["build-engine", str(built.path), "--flavor", "rtx", "--stage", "pixelwse"])
    assert res.exit_code == 2 and "did you mean 'pixelwise'" in res.output
    res = r.invoke(app, ["build-engine", str(built.path), "--flavor", "rtx", "--arch", "sm_90"])
    assert res.exit_code == 2 and "--flavor tensorrt" in res.output
    res = r.invoke(app, ["build-engine", str(built.path), "--flavor", "rtx", "--min", "1x20x16"])
    assert res.exit_code == 2 and "multiples of S=16" in res.output


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


@pytest.mark.parametrize("text,want", [("1x1024x1024", (1, 1024, 1024)), ("4X32x48", (4, 32, 48)), ("64x32", (1, 64, 32)),
                                       ("1x16", (1, 1, 16))])  # HxW: N = 1
def test_parse_shape(text, want):
    assert eb.parse_shape(text) == want


@pytest.mark.parametrize("text", ["1x0x16", "16", "axbxc", "1x16x16x3", ""])
def test_parse_shape_refuses(text):
    with pytest.raises(UsageError, match="NxHxW"):
        eb.parse_shape(text)


def test_profiles():
    p = eb.default_profile(64)
    assert (p.min, p.opt, p.max) == ((1, 64, 64), (1, 1024, 1024), (4, 2048, 2048))
    assert eb.default_profile(48).opt == (1, 1056, 1056)  # rounded up to multiples of S
    with pytest.raises(UsageError, match="min <= opt <= max"):
        eb.make_profile(16, "2x16x16", "1x32x32", "4x64x64")
    assert eb.make_profile(16, "1x16x16").for_input("params", 16, 7)["max"] == [4, 7, 128, 128]
    with pytest.raises(UsageError, match="unknown stage"):
        eb.stage_graphs("end2end")


# ---- the TensorRT-RTX packaging bug ------------------------------------------------------------------
def _fake_libs(tmp_path: Path) -> Path:
    d = tmp_path / "tensorrt_rtx_libs"
    d.mkdir()
    (d / trt_compat.RTX_LIB_VERSIONED).write_bytes(b"\x7fELF fake")
    return d


def test_workaround_symlink_in_package_folder(tmp_path):
    d = _fake_libs(tmp_path)
    fix = trt_compat.ensure_rtx_parser_lib(d, tmp_path / "cache", ld_library_path="")
    assert fix.how == "symlink" and (d / "libtensorrt_rtx.so").is_symlink()
    assert os.readlink(d / "libtensorrt_rtx.so") == "libtensorrt_rtx.so.1"  # relative: survives moving the venv
    assert (d / "libtensorrt_rtx.so").read_bytes() == b"\x7fELF fake"
    assert trt_compat.ensure_rtx_parser_lib(d, ld_library_path="").how == "present"


def test_workaround_read_only_package_uses_cache_and_ld_library_path(tmp_path, monkeypatch):
    d = _fake_libs(tmp_path)
    real = trt_compat._symlink

    def no_write_in_package(target, link):
        if link.parent == d:
            raise PermissionError(13, "Permission denied")
        real(target, link)

    monkeypatch.setattr(trt_compat, "_symlink", no_write_in_package)
    cache = tmp_path / "cache"
    with pytest.raises(trt_compat.RtxLibraryPathError, match="LD_LIBRARY_PATH") as ei:
        trt_compat.ensure_rtx_parser_lib(d, cache, ld_library_path="")
    assert ei.value.folder == cache and (cache / "libtensorrt_rtx.so").read_bytes() == b"\x7fELF fake"
    assert trt_compat.ensure_rtx_parser_lib(d, cache, ld_library_path=f"/nonexistent:{cache}").how == "ld_library_path"
    env = trt_compat.reexec_env(cache)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(cache)


CHILD = textwrap.dedent("""
    import sys
    from asap_deploy.plugins import trt_compat
    if sys.argv[2] == "fix":
        print("fix:", trt_compat.ensure_rtx_parser_lib().how)
    import tensorrt_rtx as trt
    from asap_deploy.plugins import tensorrt as tp
    tp.register(trt)
    logger = trt.Logger(trt.Logger.ERROR)
    net = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    ok = trt.OnnxParser(net, logger).parse_from_file(sys.argv[1])
    print("parsed", ok, sum(net.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(net.num_layers)))
""")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:3] if x.isdigit())


RTX_PARSER_BUG_UP_TO = (1, 7, 1)  # the last tensorrt-rtx wheel known to abort without the link


def test_parser_bug_reproduced_and_fixed_in_subprocess(trt, built, tmp_path):
    """A private copy of tensorrt_rtx_libs without the unversioned name (as the wheel ships it):
    parsing a plugin node without the fix aborts the process; with it, it parses."""
    import tensorrt_rtx_libs

    src = Path(list(tensorrt_rtx_libs.__path__)[0])
    site = tmp_path / "site"
    libs = site / "tensorrt_rtx_libs"
    libs.mkdir(parents=True)
    shutil.copy(src / "__init__.py", libs / "__init__.py")
    for f in src.glob("*.so.1"):
        try:
            os.link(f, libs / f.name)
        except OSError:
            shutil.copy(f, libs / f.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "LD_LIBRARY_PATH": ""}
    onnx_file = str(built.file("pixelwise", "fp16"))
    run = lambda mode: subprocess.run([sys.executable, "-c", CHILD, onnx_file, mode], env=env,  # noqa: E731
                                      capture_output=True, text=True, timeout=120)
    bare = run("none")
    if _version(trt.__version__) <= RTX_PARSER_BUG_UP_TO:  # the bug must show, or the test proves nothing
        assert bare.returncode != 0, f"tensorrt-rtx {trt.__version__} parsed without the fix: {bare.stdout}"
        assert "terminate called" in bare.stderr or bare.returncode < 0, (bare.returncode, bare.stderr[-2000:])
        assert "parsed" not in bare.stdout
    else:  # a later wheel: either still the bug, or a parser that no longer needs the link
        assert (bare.returncode < 0 or "terminate called" in bare.stderr
                or (bare.returncode == 0 and "parsed True 1" in bare.stdout)), (bare.returncode, bare.stdout,
                                                                                bare.stderr[-2000:])
    fixed = run("fix")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "fix: symlink" in fixed.stdout and "parsed True 1" in fixed.stdout
    assert "terminate called" not in fixed.stderr
    assert (libs / "libtensorrt_rtx.so").is_symlink()


# ---- GPU -------------------------------------------------------------------------------------------------
def _gpu_or_skip():
    n, why = cuda_driver.cuda_device_count()
    if not n:
        pytest.skip(f"needs a CUDA GPU: {why}")
    sm, _ = cuda_driver.device_sm(0)
    if sm not in eb.RTX_ARCHS:
        pytest.skip(f"TensorRT-RTX engines do not run on sm_{sm}")
    return sm


@pytest.mark.parametrize("flavor", [pytest.param("rtx", marks=pytest.mark.gpu),
                                    pytest.param("tensorrt", marks=[pytest.mark.gpu, pytest.mark.tensorrt])])
def test_gpu_engine_matches_pytorch_and_cuda_graph_replay(tmp_path, kernel_cache, flavor):
    """fp16 engine vs the fp32 PyTorch reference (validate thresholds) and CUDA-graph replay."""
    if flavor == "rtx" and importlib_missing("tensorrt_rtx"):
        pytest.skip("tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")
    if flavor == "tensorrt" and importlib_missing("tensorrt"):
        pytest.skip("full TensorRT is not installed (pip install 'asap-deploy[tensorrt]')")
    sm = _gpu_or_skip() if flavor == "rtx" else None
    if flavor == "tensorrt" and not cuda_driver.cuda_device_count()[0]:
        pytest.skip(f"needs a CUDA GPU: {cuda_driver.cuda_device_count()[1]}")
    from asap_deploy.engines import create_engine
    from asap_deploy.engines.validate import THRESHOLDS
    from asap_deploy.random_model import random_label_maps

    bundle = load_bundle(export_model(random_generator(CFG, 5), tmp_path / "b").path)
    eb.build_engines(bundle, eb.BuildOptions(flavor=flavor, stage="end-to-end", fp16=True, archs=[sm] if sm else None,
                                             profile=eb.make_profile(16, "1x16x16", "2x64x64", "2x128x128")))
    ref = create_engine("torch", bundle)
    labels, inst = random_label_maps(CFG, 2, 64, 96, seed=2)
    want = ref.run(labels, inst).astype(np.int16)
    with create_engine("tensorrt", bundle, "fp16", flavor=flavor, cuda_graph=True) as e:
        first = e.run(labels, inst)
        replay = [e.run(labels, inst) for _ in range(3)]
    diff = np.abs(first.astype(np.int16) - want)
    mse = float((diff.astype(np.float64) ** 2).mean())
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
    assert psnr >= THRESHOLDS["fp16"]["psnr_db"], psnr
    for r in replay:
        assert np.array_equal(r, first)


# ---- kernel cache integrity and file ownership (issue 12) ---------------------------------------------------
def _private_cache(kernel_cache, tmp_path) -> tuple[Path, Path]:
    """A copy of the module's kernel cache and its one sm_86 fp16 entry."""
    d = tmp_path / "kc"
    shutil.copytree(kernel_cache, d, symlinks=True)
    for folder in d.iterdir():
        e = json.loads((folder / "index.json").read_text())["kernels"][0]
        if (e["arch"], e["params_dtype"]) == ("sm_86", "fp16"):
            return d, folder
    raise AssertionError("no sm_86 fp16 entry")


def _build_pixelwise(built, out, cache, *extra):
    from asap_deploy.cli import app

    return CliRunner().invoke(app, ["build-engine", str(built.path), "--fp16", "--flavor", "rtx", "--arch", "sm_86",
                                    "--stage", "pixelwise", "-o", str(out), *SHAPES, *extra],
                              env={"ASAP_KERNEL_CACHE": str(cache)})


def test_flipped_byte_in_a_cached_kernel_is_recompiled_and_the_build_succeeds(built, kernel_cache, tmp_path):
    """The issue's case: one flipped byte in a cached cubin used to fail every later build inside
    TensorRT; now the entry is verified, recompiled, and the engine carries sound kernels."""
    cache, entry = _private_cache(kernel_cache, tmp_path)
    cubin = next(entry.glob("*.cubin"))
    data = bytearray(cubin.read_bytes())
    data[len(data) // 3] ^= 0x04
    cubin.write_bytes(bytes(data))
    res = _build_pixelwise(built, tmp_path / "e", cache)
    assert res.exit_code == 0, res.output
    pack = _pack_in((tmp_path / "e" / "pixelwise.fp16.rtx.engine").read_bytes())  # verifies every image's sha256
    assert pack.kernels[0].cubin == cubin.read_bytes() != bytes(data)


def test_cache_entry_leaving_the_cache_is_refused_with_the_cause(built, kernel_cache, tmp_path):
    cache, entry = _private_cache(kernel_cache, tmp_path)
    outside = tmp_path / "outside"
    shutil.move(str(entry), outside)
    entry.symlink_to(outside)
    res = _build_pixelwise(built, tmp_path / "e", cache)
    assert res.exit_code == 10, res.output
    assert "not a folder" in res.output and "ASAP_KERNEL_CACHE" in " ".join(res.output.split())
    assert entry.is_symlink() and (outside / "index.json").is_file() and not (tmp_path / "e").exists()


def test_engines_and_sidecars_are_claimed_in_the_bundle_marker(built):
    from asap_deploy.io import owns_file, read_marker

    assert read_marker(built.path)["kind"] == "bundle"
    for g in ("predictor", "pixelwise", "asap"):
        eng = built.path / f"{g}.fp16.rtx.engine"
        assert owns_file(eng) and owns_file(eb.sidecar_path(eng))


@pytest.mark.parametrize("which", ["pixelwise.fp16.rtx.engine", "pixelwise.fp16.rtx.engine.json"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_build_never_replaces_an_engine_or_sidecar_asap_did_not_write(built, kernel_cache, tmp_path, which, overwrite):
    out = tmp_path / "e"
    out.mkdir()
    (out / which).write_bytes(b"user data")
    res = _build_pixelwise(built, out, kernel_cache, *overwrite)
    assert res.exit_code == 12, res.output
    assert ("not written by asap" if overwrite else "--overwrite") in " ".join(res.output.split())
    assert sorted(p.name for p in out.iterdir()) == [which] and (out / which).read_bytes() == b"user data"


def test_build_never_replaces_a_bundle_file_through_a_hard_link(built, kernel_cache, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    src = built.path / "pixelwise.fp16.onnx"
    before = src.read_bytes()
    os.link(src, out / "pixelwise.fp16.rtx.engine")
    res = _build_pixelwise(built, out, kernel_cache, "--overwrite")
    assert res.exit_code == 12 and "replace the input" in " ".join(res.output.split()), res.output
    assert src.read_bytes() == before


def test_overwrite_replaces_engines_asap_wrote(built, kernel_cache, tmp_path):
    out = tmp_path / "e"
    assert _build_pixelwise(built, out, kernel_cache).exit_code == 0
    from asap_deploy.io import read_marker

    marker = read_marker(out)
    assert marker["kind"] == "engines" and set(marker["files"]) == {"pixelwise.fp16.rtx.engine",
                                                                     "pixelwise.fp16.rtx.engine.json"}
    res = _build_pixelwise(built, out, kernel_cache, "--overwrite")
    assert res.exit_code == 0, res.output
