"""`asap doctor`: every component reported with a status, fixes for what is missing, JSON, no torch needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from asap_deploy.cli import app
from asap_deploy.app.doctor import kernel_cache, rtx_parser_check, run_checks
from asap_deploy.engines.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]


def test_checks_cover_components_and_say_how_to_fix(tmp_path):
    checks = run_checks(tmp_path)
    names = [c.name for c in checks]
    for want in ("torch", "onnxruntime", "TensorRT", "TensorRT-RTX", "triton", "AOT kernels (cache)"):
        assert want in names
    assert any(n.startswith("GPU ") or n == "CUDA driver/device" for n in names)
    for c in checks:
        assert c.status in ("ok", "missing", "warn")
        if c.status == "missing":
            assert c.fix, c
    ort = next(c for c in checks if c.name == "onnxruntime")
    assert "CPUExecutionProvider" in ort.detail


def test_kernel_cache_counted_per_arch(tmp_path):
    for key, arch in (("k1", 80), ("k2", 80), ("k3", 90)):
        (tmp_path / key).mkdir()
        (tmp_path / key / f"asap_spatial_mlp_S8_sm{arch}.json").write_text("{}")
    assert kernel_cache(tmp_path) == {"sm_80": 2, "sm_90": 1}


def _listing(d: Path) -> list[tuple[str, bool]]:
    return sorted((p.name, p.is_symlink()) for p in d.iterdir())


def test_rtx_workaround_reported_without_touching_disk(tmp_path, monkeypatch):
    """Each state of the parser-library workaround is reported as such, and the check only looks:
    it never creates the link it reports missing."""
    from asap_deploy.plugins import trt_compat

    libs = tmp_path / "tensorrt_rtx_libs"
    libs.mkdir()
    (libs / trt_compat.RTX_LIB_VERSIONED).write_bytes(b"\x7fELF fake")
    monkeypatch.setattr(trt_compat, "rtx_libs_dir", lambda: libs)
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    before = _listing(libs)

    c = rtx_parser_check()  # the wheel as shipped: only the versioned name
    assert c.status == "warn", c
    assert f"{trt_compat.RTX_LIB} not in place yet" in c.detail and "writable" in c.detail
    assert c.fix.startswith("nothing to do: asap build-engine")
    assert _listing(libs) == before  # reported, not fixed

    elsewhere = tmp_path / "ld"
    elsewhere.mkdir()
    (elsewhere / trt_compat.RTX_LIB).write_bytes(b"")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{elsewhere}")
    c = rtx_parser_check()
    assert (c.status, c.detail) == ("ok", f"{elsewhere / trt_compat.RTX_LIB} on LD_LIBRARY_PATH")

    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    (libs / trt_compat.RTX_LIB).symlink_to(trt_compat.RTX_LIB_VERSIONED)
    c = rtx_parser_check()
    assert (c.status, c.detail) == ("ok", f"{libs / trt_compat.RTX_LIB} present")

    def not_installed():
        raise trt_compat.TrtUnavailable("tensorrt_rtx_libs is not installed")

    monkeypatch.setattr(trt_compat, "rtx_libs_dir", not_installed)
    c = rtx_parser_check()
    assert c.status == "warn" and "not installed" in c.detail and c.fix == trt_compat.INSTALL["rtx"]


def test_rtx_check_leaves_the_real_package_folder_alone():
    from asap_deploy.plugins import trt_compat

    try:
        libs = trt_compat.rtx_libs_dir()
    except trt_compat.TrtUnavailable:
        libs = None
    before = _listing(libs) if libs else None
    c = rtx_parser_check()
    assert c.status in ("ok", "warn") and (c.detail and (c.status == "ok" or c.fix)), c
    if libs:
        assert _listing(libs) == before


def test_machine_info_names_cpu_and_libraries():
    info = machine_info()
    assert info["cpu"] and info["cores"] >= 1 and "onnxruntime" in info["libraries"]
    assert "gpu" in info


def test_cli_json_and_table(tmp_path):
    r = CliRunner().invoke(app, ["doctor", "--json", "--kernel-cache", str(tmp_path)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert set(d) == {"machine", "checks", "backends"} and d["backends"]["onnxruntime"].startswith("yes")
    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0 and "backends usable here" in r.output


def test_doctor_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from typer.testing import CliRunner\nfrom asap_deploy.cli import app\n"
            "r = CliRunner().invoke(app, ['doctor', '--json'])\nassert r.exit_code == 0, r.output\n"
            "import json; d = json.loads(r.output)\n"
            "t = [c for c in d['checks'] if c['name'] == 'torch'][0]\n"
            "assert t['status'] == 'missing' and 'asap-deploy[torch]' in t['fix'], t\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
