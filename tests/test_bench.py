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
FAST = dict(warmup_s=0.0, min_iters=2, min_seconds=0.0, sgemm=False)  # the sgemm floor: tests/test_bench_precisions.py


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
                        precisions=["fp32"], threads=1, **FAST)
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
    assert "| authors | fp32 | 16x24 | 1 | predictor | 1 | ok" in md and rep["machine"]["cpu"] in md
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


# ---- issue 14: a bench a user can trust ---------------------------------------------------------------
from asap_deploy.engines import bench as bench_mod  # noqa: E402
from asap_deploy.engines.bench import _Context, planned_rows  # noqa: E402
from asap_deploy.engines.bench_report import (  # noqa: E402
    NOISY_CV, figure, ms_label, numbered_dir, report_warnings, row_line, tick_label)
from asap_deploy.errors import BenchRowsFailed  # noqa: E402


class FakeClock:
    """time.perf_counter that advances `step` seconds on every call the measured function makes."""

    def __init__(self, steps):
        self.t, self.steps = 0.0, iter(steps)

    def __call__(self):
        return self.t

    def call(self):
        self.t += next(self.steps)


def test_defaults_are_short_and_the_cli_uses_them():
    """The default run is sized for about two minutes on 2 cores (fewer calls, a shorter minimum
    time per row); `asap bench` without flags uses exactly BenchOptions' defaults."""
    import typer.main

    d = BenchOptions()
    assert (d.warmup_s, d.min_iters, d.min_seconds, d.threads) == (0.2, 3, 2.0, None)
    assert d.sizes == [(1024, 1024)] and d.batches == [1] and d.stages == ["predictor", "pixelwise", "end_to_end"]
    assert planned_rows(d) == 3 * 3  # authors + torch + onnxruntime, 3 stages each
    params = {p.name: p.default for p in typer.main.get_command(app).commands["bench"].params}
    assert (params["warmup"], params["iterations"], params["duration"], params["threads"]) == (0.2, 3, 2.0, None)
    assert params["out"] is None  # the numbered default folder


def test_duration_buys_more_samples(monkeypatch):
    """Timed calls continue until --duration has passed (fake clock: each call takes 0.1 s)."""
    counts = {}
    for duration in (0.5, 2.0):
        clock = FakeClock([0.1] * 1000)
        monkeypatch.setattr(bench_mod.time, "perf_counter", clock)
        out = measure(clock.call, BenchOptions(warmup_s=0.0, min_iters=3, min_seconds=duration, memory=False), 1)
        counts[duration] = out["iterations"]
    assert counts[0.5] == 5 and counts[2.0] == 20


def test_cv_and_noisy_rows(monkeypatch):
    clock = FakeClock([1.0] + [1.0, 3.0] * 5)  # warm-up, then alternating 1 s and 3 s calls
    monkeypatch.setattr(bench_mod.time, "perf_counter", clock)
    out = measure(clock.call, BenchOptions(warmup_s=0.0, min_iters=10, min_seconds=0.0, memory=False), 1)
    assert out["cv"] == pytest.approx(statistics.stdev([1.0, 3.0] * 5) / 2.0) and out["cv"] > NOISY_CV
    assert summarize([0.5], 1, 0.5)["cv"] is None  # one sample: no spread to judge


def test_noisy_rows_and_a_busy_machine_are_flagged(bundle):
    rep = run_bench(bundle, BenchOptions(backends=["onnxruntime"], sizes=[(16, 16)], stages=["end_to_end"], **FAST))
    ok = [r for r in rep["rows"] if r["status"] == "ok"]
    assert all(isinstance(r["noisy"], bool) and r["noisy"] == (r["cv"] > NOISY_CV) for r in ok)
    noisy = ok[1]
    noisy.update(cv=0.5, noisy=True)
    quiet = ok[0]
    quiet.update(cv=0.01, noisy=False)
    rep["machine"]["cores"], rep["machine"]["load_avg_start"], rep["machine"]["load_avg_end"] = 2, [3.5, 2, 2], [0.2, 1, 1]
    rep["warnings"] = report_warnings(rep)
    validate_report(rep)
    text = " ".join(rep["warnings"])
    assert "1 of 2 row(s) are noisy" in text and "50%" in text and "load average (1 min) 3.5 at the start" in text
    assert "at the end" not in text
    md = to_markdown(rep)
    assert "50.0% !" in md and "ok (noisy)" in md and "**Warnings**" in md and "load average (1 min) 3.5" in md
    assert "NOISY" in row_line(noisy) and "NOISY" not in row_line(quiet)
    # the plot: the noisy row's bar is hatched and its label marked, the quiet one is not
    fig = figure(rep)
    ax = fig.axes[0]
    hatched = [b.get_hatch() for b in ax.patches]
    assert hatched.count("///") == 1 and len(hatched) == 2
    labels = [t.get_text() for t in ax.texts]
    assert sum(t.endswith(" !") for t in labels) == 1
    assert any("noisy" in t.get_text() and "busy" in t.get_text() for t in fig.texts)


def test_latency_plot_has_plain_numbers_and_no_clipped_text(bundle):
    rep = run_bench(bundle, BenchOptions(backends=["onnxruntime"], sizes=[(16, 16)], precisions=["fp32", "fp16"],
                                         **FAST))
    for r in rep["rows"]:  # latencies across five decades, as a slow CPU gives them
        if r["status"] == "ok":
            r["median_ms"] = {"predictor": 0.0123, "pixelwise": 1333.4, "end_to_end": 16017.0}[r["stage"]]
    rep["machine"]["cpu"] = " ".join(["Intel(R) Xeon(R) Platinum 8480+ Processor @ 2.0GHz"] * 4)  # a long machine line
    assert ms_label(1333.4) == "1333" and ms_label(16017.0) == "16017" and ms_label(0.0123) == "0.0123"
    assert ms_label(63.71) == "63.7" and tick_label(1000.0) == "1000" and tick_label(0.5) == "0.5"
    fig = figure(rep)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    def drawn_ticks(ax):  # tick labels inside the axis' view (matplotlib keeps others, undrawn)
        lo, hi = ax.get_ylim()
        return [t for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi] + ax.get_xticklabels()

    texts = list(fig.texts) + [t for ax in fig.axes for t in ax.texts + drawn_ticks(ax)]
    shown = [t for t in texts if t.get_text() and t.get_visible()]
    assert len(shown) > 10
    for t in shown:
        s = t.get_text()
        assert "e+" not in s and "e-0" not in s and "$" not in s and "^" not in s, s  # no scientific notation
        e = t.get_window_extent(renderer)
        assert e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1, s
    head = " ".join(" ".join(t.get_text() for t in fig.texts).split())
    assert "machine:" in head and rep["machine"]["cpu"] in head and "onnxruntime" in head  # wrapped, not cut
    assert max(len(t.get_text().splitlines()) for t in fig.texts) >= 2


def test_threads_for_every_cpu_backend_recorded_per_row(bundle):
    import torch

    before = torch.get_num_threads()
    rep = run_bench(bundle, BenchOptions(backends=["onnxruntime", "torch", "tensorrt"], sizes=[(16, 16)],
                                         stages=["predictor"], threads=1, **FAST))
    validate_report(rep)
    by = {r["backend"]: r for r in rep["rows"]}
    assert rep["threads"] == 1 and all(by[b]["threads"] == 1 for b in ("authors", "torch", "onnxruntime"))
    assert by["tensorrt"]["threads"] is None  # a GPU backend: not governed by --threads
    assert torch.get_num_threads() == before  # restored after the run
    eng = _Context(bundle).engine("onnxruntime", "fp32", 1)
    assert eng.describe()["intra_op_threads"] == 1
    default = run_bench(bundle, BenchOptions(backends=["onnxruntime"], sizes=[(16, 16)], stages=["predictor"], **FAST))
    assert default["threads"] == bench_mod.default_threads() and "thread(s)" in to_markdown(default)
    with pytest.raises(UsageError, match="--threads"):
        BenchOptions(threads=0).check()


def test_fidelity_next_to_speed(bundle, monkeypatch):
    rep = run_bench(bundle, BenchOptions(backends=["onnxruntime", "torch"], sizes=[(16, 16)], **FAST))
    by = {(r["backend"], r["stage"]): r for r in rep["rows"]}
    for b in ("authors", "torch", "onnxruntime"):
        for st in ("pixelwise", "end_to_end"):
            f = by[(b, st)]["fidelity"]
            assert f["reference"] == "torch fp32" and f["unit"] == "8-bit levels" and f["psnr_db"] >= 40
            assert f["below_threshold"] is False
        f = by[(b, "predictor")]["fidelity"]
        assert f["psnr_db"] is None and f["cosine"] > 0.9999 and f["unit"] == "parameter units"
    assert by[("torch", "end_to_end")]["fidelity"]["max_abs"] == 0  # the reference itself
    assert "PSNR inf dB" in row_line(by[("torch", "end_to_end")])
    capped = dict(by[("torch", "end_to_end")], fidelity={**by[("torch", "end_to_end")]["fidelity"], "max_abs": 1.0})
    assert "PSNR >=100 dB" in row_line(capped)  # capped by psnr_u8 yet not identical: never called 'inf'
    # a fast but wrong backend: its output is flagged, in the row, the warnings, the table and the line
    from asap_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine

    real = OnnxRuntimeEngine.run

    def wrong(self, labels, instances=None, **kw):
        return 255 - real(self, labels, instances, **kw)

    monkeypatch.setattr(OnnxRuntimeEngine, "run", wrong)
    rep = run_bench(bundle, BenchOptions(backends=["onnxruntime"], sizes=[(16, 16)], stages=["end_to_end"], **FAST))
    validate_report(rep)
    row = next(r for r in rep["rows"] if r["backend"] == "onnxruntime")
    assert row["fidelity"]["below_threshold"] is True and row["fidelity"]["psnr_db"] < 40
    assert row["fidelity"]["max_abs"] > 100
    assert any("onnxruntime fp32 16x16 batch 1 end_to_end: output differs" in w for w in rep["warnings"])
    assert "BELOW THRESHOLD" in row_line(row) and " !" in to_markdown(rep).split("onnxruntime | fp32")[1].split("\n")[0]


def test_progress_one_line_per_finished_row(bundle, tmp_path):
    seen = []
    opts = BenchOptions(backends=["onnxruntime", "tensorrt"], sizes=[(16, 16)], stages=["predictor", "end_to_end"],
                        **FAST)
    rep = run_bench(bundle, opts, on_row=lambda row, done, total: seen.append((row["backend"], done, total)))
    assert planned_rows(opts) == 6 and [t for *_, t in seen] == [6] * len(seen) and seen[-1][1] == 6
    assert [d for _, d, _ in seen] == [1, 2, 3, 4, 6]  # tensorrt fails to open: its 2 rows end at once
    assert len(seen) == len(rep["rows"])
    # piped (not a terminal): one plain line per finished row, as each finishes
    r = CliRunner().invoke(app, ["bench", "--bundle", str(bundle.path), "--size", "16", "-b", "onnxruntime",
                                 "--warmup", "0", "--iterations", "2", "--duration", "0", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in lines] == [f"[{i}/6" for i in range(1, 7)]
    assert all(" ms" in ln and "PSNR" in ln or "cosine" in ln for ln in lines)
    assert "threads" in r.output and "settings:" in "".join(r.output.split("\n"))


def test_failed_row_exits_13_with_the_whole_reason(bundle, tmp_path):
    r = CliRunner().invoke(app, ["bench", "--bundle", str(bundle.path), "--size", "16", "-b", "onnxruntime,tensorrt",
                                 "--warmup", "0", "--iterations", "1", "--duration", "0",
                                 "-o", str(tmp_path / "o")])
    assert r.exit_code == BenchRowsFailed.exit_code == 13, r.output
    flat = "".join(r.output.split())
    reason = f"build it with: asap build-engine {bundle.path} --flavor"
    assert "".join(f"failed: tensorrt fp32 16x16 batch 1 all: failed: {bundle.path}".split()) in flat
    assert "".join(reason.split()) in flat  # whole, not cut
    assert "1of7row(s)failed" in flat and (tmp_path / "o" / "report.json").is_file()  # reports still written
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    long = "x" * 2000
    assert bench_mod._status(ValueError(long)) == "failed: " + long  # never cut
    assert any(r_["status"].startswith("failed:") for r_ in rep["rows"])


def test_default_folder_is_numbered_per_run(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--bundle", str(bundle.path), "--size", "16", "-b", "onnxruntime", "--warmup",
            "0", "--iterations", "1", "--duration", "0", "--no-memory", "--no-sgemm"]
    for _ in range(3):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asap_bench", "asap_bench2", "asap_bench3"]
    from asap_deploy.io import read_marker

    for d in ("asap_bench", "asap_bench2", "asap_bench3"):
        assert set(read_marker(tmp_path / d)["files"]) == {"report.json", "report.md", "latency.png"}
    # a folder of the user's under the next name is skipped, never written into
    (tmp_path / "asap_bench4").mkdir()
    (tmp_path / "asap_bench4" / "notes.txt").write_text("mine")
    assert numbered_dir(Path("asap_bench")) == Path("asap_bench5")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and (tmp_path / "asap_bench5" / "report.json").is_file()
    assert sorted(p.name for p in (tmp_path / "asap_bench4").iterdir()) == ["notes.txt"]
    # --overwrite without -o: the plain default folder, replaced (asap's own reports only)
    r = CliRunner().invoke(app, args + ["--overwrite"])
    assert r.exit_code == 0 and not (tmp_path / "asap_bench6").exists()
    # an explicit -o that exists keeps the refuse-without---overwrite rule
    r = CliRunner().invoke(app, args + ["-o", "asap_bench2"])
    assert r.exit_code == 12 and "--overwrite" in r.output
