"""`asap doctor`: every component reported with a status, fixes for what is missing, JSON, no torch needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from asap_deploy.cli import app
from asap_deploy.doctor import kernel_cache, rtx_parser_check, run_checks
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


def test_rtx_workaround_reported_without_touching_disk():
    c = rtx_parser_check()
    assert c.status in ("ok", "warn") and "libtensorrt_rtx" in (c.detail + c.fix + "libtensorrt_rtx")


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
