"""`asap export CHECKPOINT -o BUNDLE --engine rtx|tensorrt` (issue 14): export, engine build and
validation in one command (asap_deploy/app/pipeline.py), built with TensorRT-RTX on the CPU (tiny
config, one architecture, end-to-end stage: seconds); every refusal happens before any work; and
`asap build-engine CHECKPOINT` names the one command to run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asap_deploy.checkpoints import save_generator
from asap_deploy.config import ModelConfig
from asap_deploy.random_model import random_generator

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, instance_edges=True, crop_size=256, learned_ds_factor=8,
                  lr_width=8, lr_max_width=8, lr_depth=1, hr_width=16, hr_depth=3)  # S=16, tiny MLP
CHEAP = ["--arch", "sm_86", "--stage", "end-to-end"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_generator(random_generator(CFG, 3), tmp_path_factory.mktemp("ck") / "model.pt")


@pytest.fixture(scope="module")
def rtx():
    pytest.importorskip("triton", reason="triton not installed (the plugin's kernels are compiled with it)")
    return pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")


def invoke(*args: str):
    from asap_deploy.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def gpu_here() -> bool:
    from asap_deploy.plugins.cuda_driver import cuda_device_count

    return cuda_device_count()[0] > 0


# ---- the one command -----------------------------------------------------------------------------
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_export_builds_and_validates_in_one_command(rtx, checkpoint, kernel_cache, tmp_path, fp16):
    bundle = tmp_path / "bundle"
    res = invoke("export", checkpoint, "-o", bundle, "--engine", "rtx", *CHEAP, *(["--fp16"] if fp16 else []))
    assert res.exit_code == 0, res.output
    prec = "fp16" if fp16 else "fp32"
    engine = bundle / f"asap.{prec}.rtx.engine"
    assert (bundle / "manifest.json").is_file() and engine.is_file()
    sidecar = json.loads((bundle / f"asap.{prec}.rtx.engine.json").read_text())
    assert sidecar["precision"] == prec and sidecar["targets"]["sm"] == [86] and sidecar["graph"] == "asap"
    assert sidecar["source_onnx"]["file"] == ("asap.fp16.onnx" if fp16 else "asap.onnx")
    assert not (bundle / "predictor.fp32.rtx.engine").exists()  # --stage end-to-end only
    report = json.loads((tmp_path / "bundle-validation" / "report.json").read_text())
    assert report["passed"] and report["precision"] == prec and "onnxruntime" in report["backends"]
    out = " ".join(res.output.split())  # rich may fold long lines
    assert f"engine {engine}" in out and "validation onnxruntime vs the PyTorch fp32 reference" in out
    assert "next:" in out and f"--bundle {bundle} --backend tensorrt" in out and f"asap bench --bundle {bundle}" in out
    if fp16:
        assert "--backend tensorrt --precision fp16" in out
    if not gpu_here():  # said plainly: built, not run, and where it runs
        assert "built but not run here" in out and "GPU of sm_86" in out
        assert "tensorrt" not in report["backends"]
        assert f"--bundle {bundle} --backend onnxruntime" in out
    assert "PASSED | 1 engine(s)" in out


def test_failed_validation_exits_9_and_keeps_the_outputs(rtx, checkpoint, kernel_cache, tmp_path, monkeypatch):
    from asap_deploy.engines import validate as ev

    impossible = ev.Thresholds(max_abs=None, mean_abs=None, psnr_db=1000.0, differing_share=None, max_levels=None,
                               params_cosine=0.0)
    monkeypatch.setitem(ev.THRESHOLDS, "fp32", impossible)
    bundle = tmp_path / "bundle"
    res = invoke("export", checkpoint, "-o", bundle, "--engine", "rtx", *CHEAP)
    assert res.exit_code == 9, res.output
    assert "FAILED" in res.output and "outside the fp32 thresholds" in " ".join(res.output.split())
    assert (bundle / "asap.fp32.rtx.engine").is_file() and (tmp_path / "bundle-validation" / "report.json").is_file()


# ---- refusals before any work --------------------------------------------------------------------
@pytest.mark.parametrize("args, code, words", [
    (["--engine", "onnx"], 2, "not a TensorRT flavour"),
    (["--engine", "rtxx"], 2, "did you mean 'rtx'"),
    (["--arch", "sm_86"], 2, "give --engine rtx or --engine tensorrt"),
    (["--stage", "end-to-end"], 2, "give --engine rtx or --engine tensorrt"),
    (["--engine", "rtx", "--stage", "everything"], 2, "unknown stage"),
    (["--engine", "rtx", "--arch", "sm_6x"], 2, "bad architecture"),
], ids=["flavour", "typo", "arch-alone", "stage-alone", "stage", "arch"])
def test_bad_arguments_are_refused_before_any_work(checkpoint, tmp_path, args, code, words):
    res = invoke("export", checkpoint, "-o", tmp_path / "bundle", *args)
    assert res.exit_code == code, res.output
    assert words in " ".join(res.output.split())
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle-validation").exists()


def test_rtx_cannot_target_sm90(rtx, checkpoint, tmp_path):
    res = invoke("export", checkpoint, "-o", tmp_path / "bundle", "--engine", "rtx", "--arch", "sm_90")
    assert res.exit_code == 2, res.output
    assert "cannot target sm_90" in " ".join(res.output.split())
    assert not (tmp_path / "bundle").exists()


def test_full_tensorrt_without_it_names_the_extra(checkpoint, tmp_path):
    from asap_deploy.engines.machine import importable

    if importable("tensorrt") and gpu_here():
        pytest.skip("full TensorRT and a GPU are here")
    res = invoke("export", checkpoint, "-o", tmp_path / "bundle", "--engine", "tensorrt")
    assert res.exit_code == 6, res.output
    out = " ".join(res.output.split())
    assert "asap-deploy[tensorrt]" in out or "needs an NVIDIA GPU" in out
    assert not (tmp_path / "bundle").exists()


def test_a_bundle_given_as_checkpoint_names_build_engine(checkpoint, tmp_path):
    from asap_deploy.export.bundle import export_checkpoint

    bundle = export_checkpoint(checkpoint, tmp_path / "b", fp16=False).path
    res = invoke("export", bundle, "-o", tmp_path / "other", "--engine", "rtx")
    assert res.exit_code == 2, res.output
    assert f"asap build-engine {bundle} --flavor rtx" in " ".join(res.output.split())


def test_a_foreign_report_folder_is_refused_before_the_export(checkpoint, tmp_path):
    (tmp_path / "bundle-validation").mkdir()
    (tmp_path / "bundle-validation" / "notes.txt").write_text("mine")
    res = invoke("export", checkpoint, "-o", tmp_path / "bundle", "--engine", "rtx", *CHEAP)
    assert res.exit_code == 12, res.output
    assert not (tmp_path / "bundle").exists() and (tmp_path / "bundle-validation" / "notes.txt").read_text() == "mine"


RUNNER = """
import sys
sys.modules[sys.argv[1]] = None  # as a missing package looks to `import`
from asap_deploy.cli import app
app(sys.argv[2:], prog_name="asap")
"""


@pytest.mark.parametrize("blocked, extra", [("tensorrt_rtx", "asap-deploy[rtx]"), ("triton", "asap-deploy[rtx]"),
                                            ("torch", "asap-deploy[torch]")])
def test_a_missing_extra_is_named_before_any_work(checkpoint, tmp_path, blocked, extra):
    bundle = tmp_path / "bundle"
    res = subprocess.run([sys.executable, "-c", RUNNER, blocked, "export", str(checkpoint), "-o", str(bundle),
                          "--engine", "rtx", *CHEAP], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "COLUMNS": "400"})
    assert res.returncode == 6, res.stdout + res.stderr
    assert extra in res.stderr and "Traceback" not in res.stderr
    assert not bundle.exists() and not (tmp_path / "bundle-validation").exists()


# ---- build-engine given a checkpoint ---------------------------------------------------------------
def test_build_engine_given_a_checkpoint_says_which_command(checkpoint):
    res = invoke("build-engine", checkpoint, "--flavor", "rtx", "--fp16", "--arch", "sm_86")
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    want = f"asap export {checkpoint} -o {checkpoint.with_name('model-bundle')} --engine rtx --fp16 --arch sm_86"
    assert "not a bundle folder" in out and want in out


def test_build_engine_given_a_manifest_names_its_folder(checkpoint, tmp_path):
    from asap_deploy.export.bundle import export_checkpoint

    bundle = export_checkpoint(checkpoint, tmp_path / "b", fp16=False).path
    res = invoke("build-engine", bundle / "manifest.json", "--flavor", "rtx")
    assert res.exit_code == 2, res.output
    assert f"asap build-engine {bundle}" in " ".join(res.output.split())
