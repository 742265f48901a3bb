"""`asap compile-kernels` end to end (one architecture, a small config)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from typer.testing import CliRunner  # noqa: E402

from asap_deploy.cli import app  # noqa: E402


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
