"""`asap compile-kernels` end to end (one architecture, a small config)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from typer.testing import CliRunner  # noqa: E402

from asap_deploy.cli import app  # noqa: E402
from asap_deploy.io import MARKER  # noqa: E402


def test_compile_kernels_command(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"label_nc": 5, "crop_size": 256}))
    out = tmp_path / "kernels"
    res = CliRunner().invoke(app, ["compile-kernels", "--arch", "sm_86", "--config", str(cfg), "--out-dtype", "fp32",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output
    index = json.loads((out / "index.json").read_text())
    assert [e["kind"] for e in index["kernels"]] == ["spatial_mlp", "repack", "repack"]  # re-pack from fp16 and fp32
    assert all((out / e["json"]).is_file() for e in index["kernels"])


def test_compile_kernels_bad_arch_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(app, ["compile-kernels", "--arch", "sm_8x", "-o", str(tmp_path / "k")])
    assert res.exit_code == 2
    assert "bad architecture" in res.output
    assert not (tmp_path / "k").exists()


def test_sigint_mid_compile_leaves_no_index_and_no_temp_file(tmp_path):
    """Ctrl-C after the first kernel file: exit 130, no temp file, and no index.json (written last:
    a folder without it is incomplete, and the next run may write there without --overwrite)."""
    root = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"label_nc": 5, "crop_size": 256}))
    hook = ("import os, signal\nimport asap_deploy.plugins.aot as aot\n_real, _n = aot.atomic_path, [0]\n"
            "def ap(*a, **k):\n    _n[0] += 1\n    if _n[0] == 2: os.kill(os.getpid(), signal.SIGINT)\n"
            "    return _real(*a, **k)\naot.atomic_path = ap\n")
    argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r})\n{hook}\n"
            "sys.argv = ['asap'] + sys.argv[1:]\nfrom asap_deploy.cli import app\napp()\n",
            "compile-kernels", "--arch", "sm_86", "--config", str(cfg), "--out-dtype", "fp32", "-o", str(tmp_path / "k")]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "k").iterdir()) if (tmp_path / "k").exists() else []
    assert "index.json" not in left and not [n for n in left if n.startswith(".") and n != MARKER], left
    res = CliRunner().invoke(app, ["compile-kernels", "--arch", "sm_86", "--config", str(cfg), "--out-dtype", "fp32",
                                   "-o", str(tmp_path / "k")])
    assert res.exit_code == 0, res.output  # an incomplete folder is finished without --overwrite
    index = json.loads((tmp_path / "k" / "index.json").read_text())
    assert all((tmp_path / "k" / e["json"]).is_file() for e in index["kernels"])


# ---- ownership: only files asap wrote are replaced; a folder of other files is never written into ------
def _compile(cfg: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["compile-kernels", "--arch", "sm_86", "--config", str(cfg), "--out-dtype", "fp32",
                                    "--params-dtype", "fp16", "-o", str(out), *extra])


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"label_nc": 5, "crop_size": 256}))
    return p


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_compile_kernels_refuses_a_folder_of_foreign_files(tmp_path, cfg, overwrite):
    out = tmp_path / "k"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = _compile(cfg, out, *overwrite)
    assert res.exit_code == 12 and "did not write" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_compile_kernels_refuses_another_kind_of_asap_folder_and_a_file(tmp_path, cfg):
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / MARKER).write_text(json.dumps({"tool": "asap-deploy", "schema": 1, "kind": "bundle",
                                          "files": ["manifest.json"]}))
    res = _compile(cfg, out, "--overwrite")
    assert res.exit_code == 12 and "bundle" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "manifest.json"]
    (tmp_path / "f").write_text("a file")
    res = _compile(cfg, tmp_path / "f")
    assert res.exit_code == 12 and "not a folder" in res.output and (tmp_path / "f").read_text() == "a file"


def test_compile_kernels_overwrite_replaces_only_claimed_files(tmp_path, cfg):
    out = tmp_path / "k"
    assert _compile(cfg, out).exit_code == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "kernels" and sorted(marker["files"]) == sorted(p.name for p in out.iterdir()
                                                                             if p.name != MARKER)
    res = _compile(cfg, out)
    assert res.exit_code == 12 and "--overwrite" in res.output
    assert _compile(cfg, out, "--overwrite").exit_code == 0  # all ours: replaced
    # a file of someone else's under one of our names (not listed in the marker): never replaced
    cubin = next(p for p in out.iterdir() if p.suffix == ".cubin")
    marker = json.loads((out / MARKER).read_text())
    marker["files"].remove(cubin.name)
    (out / MARKER).write_text(json.dumps(marker))
    cubin.write_bytes(b"user data")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = _compile(cfg, out, "--overwrite")
    assert res.exit_code == 12 and cubin.name in res.output and "not written by asap" in " ".join(res.output.split())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
