"""`asap bench`: statistics (trtexec percentile rule), the timing loop's bounds, report schema,
the authors' baseline in every run, failing backends as rows, CLI outputs. No timing assertions."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.engines.bench import BenchOptions, measure, parse_size, percentile, run_bench, summarize
from asap_deploy.engines.bench_report import to_markdown, validate_report, write_reports
from asap_deploy.errors import UsageError
from asap_deploy.export.bundle import export_model, load_bundle
from asap_deploy.random_model import random_generator

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(label_nc=5, crop_size=128, learned_ds_factor=8, lr_width=8, lr_max_width=8, lr_depth=1, hr_width=16)
FAST = dict(warmup_s=0.0, min_iters=2, min_seconds=0.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(export_model(random_generator(CFG, 0), tmp_path_factory.mktemp("bb") / "b", fp16=False).path)


def test_percentile_is_trtexecs_rule():
    s = [float(v) for v in range(1, 11)]  # n = 10
    # sorted[max(n - 1 - int((1 - p/100) * n), 0)], worked by hand
    assert percentile(s, 90) == 9.0  # 10 - 1 - int(1.0) = 8 -> 9
    assert percentile(s, 95) == 10.0  # 9 - int(0.5) = 9 -> 10
    assert percentile(s, 99) == 10.0
    assert percentile([3.0], 99) == 3.0


def test_percentile_50_hand_value():
    # n = 10, p = 50: index max(10 - 1 - int(0.5 * 10), 0) = 4 -> the 5th smallest
    assert percentile([float(v) for v in range(1, 11)], 50) == 5.0


def test_summarize_against_statistics():
    rng = np.random.default_rng(0)
    x = list(rng.random(37))
    s = summarize(x, images_per_call=2, wall_s=4.0)
    assert s["iterations"] == 37 and s["min_ms"] == min(x) * 1e3 and s["max_ms"] == max(x) * 1e3
    assert s["median_ms"] == pytest.approx(statistics.median(x) * 1e3)
    assert s["mean_ms"] == pytest.approx(statistics.fmean(x) * 1e3)
    assert s["std_ms"] == pytest.approx(statistics.stdev(x) * 1e3)
    xs = sorted(x)
    assert s["p99_ms"] == xs[max(36 - int(0.01 * 37), 0)] * 1e3
    assert s["throughput_ips"] == pytest.approx(2 * 37 / 4.0)


def test_measure_runs_at_least_iterations_and_seconds():
    calls = []
    out = measure(lambda: calls.append(1), BenchOptions(warmup_s=0.0, min_iters=7, min_seconds=0.0), 1)
    assert out["iterations"] == 7 and len(calls) == 8  # one warm-up call
    out = measure(lambda: None, BenchOptions(warmup_s=0.0, min_iters=1, min_seconds=0.05), 1)
    assert out["total_s"] >= 0.05 and out["iterations"] >= 1


def test_measure_reports_gpu_phases_as_medians():
    """GPU engines report H2D / compute / D2H per call; bench keeps the median of each phase."""
    seq = iter([{"h2d_ms": h, "gpu_compute_ms": 10 * h, "d2h_ms": 2 * h} for h in (9, 1, 3, 2, 5)] * 2)
    out = measure(lambda: None, BenchOptions(warmup_s=0.0, min_iters=5, min_seconds=0.0), 1, phases=lambda: next(seq))
    # read after each timed call only (not after the warm-up): 9, 1, 3, 2, 5 -> median 3
    assert out["phases_ms"] == {"h2d_ms": 3, "gpu_compute_ms": 30, "d2h_ms": 6}
    assert measure(lambda: None, BenchOptions(**FAST), 1)["phases_ms"] is None


def test_markdown_shows_gpu_phases(bundle):
    rep = run_bench(bundle, BenchOptions(backends=["onnxruntime"], sizes=[(16, 16)], stages=["end_to_end"], **FAST))
    row = next(r for r in rep["rows"] if r["backend"] == "onnxruntime")
    row["phases_ms"] = {"h2d_ms": 0.125, "gpu_compute_ms": 1.5, "d2h_ms": 0.25}
    validate_report(rep)
    assert "| onnxruntime | fp32 | 16x16 | 1 | end_to_end | 0.125 | 1.500 | 0.250 |" in to_markdown(rep)
    row["phases_ms"] = {"h2d_ms": "fast"}
    with pytest.raises(ValueError, match="phases_ms"):
        validate_report(rep)


def test_run_bench_report_baseline_and_failed_rows(bundle, tmp_path):
    opts = BenchOptions(backends=["onnxruntime", "tensorrt", "torch"], sizes=[(16, 24)], batches=[1, 2],
                        precisions=["fp32"], **FAST)
    rep = run_bench(bundle, opts)
    validate_report(rep)
    json.loads(json.dumps(rep))  # JSON-serialisable
    rows = rep["rows"]
    by = {(r["backend"], r["batch"], r["stage"]): r for r in rows}
    for batch in (1, 2):
        for st in ("predictor", "pixelwise", "end_to_end"):
            a = by[("authors", batch, st)]
            assert a["status"] == "ok" and a["vs_authors"] == 1.0
            o = by[("onnxruntime", batch, st)]
            assert o["status"] == "ok" and o["vs_authors"] == pytest.approx(o["median_ms"] / a["median_ms"])
            assert o["speedup_vs_authors"] == pytest.approx(a["median_ms"] / o["median_ms"])
        t = by[("tensorrt", batch, "all")]
        assert t["status"].startswith("failed:") and "build-engine" in t["status"]
    assert rows[0]["backend"] == "authors"  # the baseline leads, even when not asked for
    assert rep["machine"]["cpu"] and rep["machine"]["cores"] >= 1 and "onnxruntime" in rep["machine"]["libraries"]
    md = to_markdown(rep)
    assert "| authors | fp32 | 16x24 | 1 | predictor | ok |" in md and rep["machine"]["cpu"] in md
    paths = write_reports(rep, tmp_path / "r", tmp_path / "x.json")
    assert json.loads(paths["json_file"].read_text()) == json.loads(paths["json"].read_text())
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_report_rejects_broken_reports(bundle):
    rep = run_bench(bundle, BenchOptions(backends=["onnxruntime"], sizes=[(16, 16)], stages=["predictor"], **FAST))
    bad = json.loads(json.dumps(rep))
    del bad["rows"][0]["median_ms"]
    with pytest.raises(ValueError, match=r"rows\[0\]\.median_ms"):
        validate_report(bad)
    bad = json.loads(json.dumps(rep))
    bad["machine"].pop("cpu")
    with pytest.raises(ValueError, match="machine.cpu"):
        validate_report(bad)


def test_options_checked():
    with pytest.raises(UsageError, match="did you mean 'onnxruntime'"):
        BenchOptions(backends=["onnxruntim"]).check()
    with pytest.raises(UsageError, match="not a multiple of S=8"):
        BenchOptions(sizes=[(12, 16)]).check(8)
    assert parse_size("512x1024") == (512, 1024) and parse_size("64") == (64, 64)
    with pytest.raises(UsageError):
        parse_size("axb")


def test_cli_bench(bundle, tmp_path):
    r = CliRunner().invoke(app, ["bench", "--bundle", str(bundle.path), "--size", "16", "--backends", "onnxruntime",
                                 "--warmup", "0", "--iterations", "2", "--duration", "0", "-o", str(tmp_path / "o"),
                                 "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "b.json").read_text())
    validate_report(rep)
    assert {x["backend"] for x in rep["rows"]} == {"authors", "onnxruntime"}
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "latency.png").is_file()
    assert "machine:" in r.output and "authors" in r.output
    r = CliRunner().invoke(app, ["bench", "--bundle", str(bundle.path), "--size", "12", "-o", str(tmp_path / "p")])
    assert r.exit_code == UsageError.exit_code and "multiple of S=8" in r.output
    r = CliRunner().invoke(app, ["bench", "--bundle", str(bundle.path), "--model", "x.pt"])
    assert r.exit_code == UsageError.exit_code


def test_cli_bench_subprocess(bundle, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "bench", "--bundle", str(bundle.path), "--size", "16x24",
                          "--backends", "torch", "--iterations", "2", "--duration", "0", "--warmup", "0",
                          "--no-memory", "-o", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    validate_report(rep)
    assert all(r["peak_host_mib"] is None for r in rep["rows"])
