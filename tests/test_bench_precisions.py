"""`asap bench --precision all` (issue 16): rows for every precision each backend lists (registry
stand-ins: onnxruntime with int8, a CPU `openvino` with fp32/bf16/int8 opening a recording stand-in
engine), precisions the bundle has no graphs for skipped with the reason, every row's ratios to the
ONE fp32 authors' baseline on medians and on best times, a noisy baseline marked, and the sgemm
floor (its FLOP count against the config's math, the floor at a stand-in rate). No timing asserts."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from asap_deploy.cli import app
from asap_deploy.config import ModelConfig, preset
from asap_deploy.engines import bench as bench_mod
from asap_deploy.engines import machine, registry
from asap_deploy.engines.bench import BenchOptions, add_ratios, plan, run_bench
from asap_deploy.engines.bench_report import (NOISY_CV, report_warnings, row_line, table_rows, TERMINAL_COLUMNS,
                                              to_markdown, validate_report)
from asap_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from asap_deploy.engines.validate import THRESHOLDS
from asap_deploy.errors import UsageError
from asap_deploy.export.bundle import Bundle, export_model, load_bundle
from asap_deploy.random_model import random_generator

CFG = ModelConfig(label_nc=5, crop_size=128, learned_ds_factor=8, lr_width=8, lr_max_width=8, lr_depth=1, hr_width=16)
FAST = dict(warmup_s=0.0, min_iters=2, min_seconds=0.0, sizes=[(16, 16)], memory=False)
RATE = {"library": "stand-in", "threads": 1, "gflops": 50.0,
        "square": {"a": [8, 8], "b": [8, 8], "gflops": 50.0}, "tiles": {"a": [1, 64, 16], "b": [1, 16, 16],
                                                                        "tiles": 1, "gflops": 40.0}}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(export_model(random_generator(CFG, 0), tmp_path_factory.mktemp("bp") / "b", fp16=True).path)


class StandIn(OnnxRuntimeEngine):
    """ONNX Runtime on the fp32 graphs standing in for a precision this test machine's bundle lacks."""

    opened: list = []

    def __init__(self, bundle, precision="fp32", intra_op_threads=None, **kw):
        super().__init__(bundle, "fp32", intra_op_threads=intra_op_threads, **kw)
        StandIn.opened.append((self.name, precision, intra_op_threads))


def _named(name):
    return type(f"StandIn_{name}", (StandIn,), {"name": name})


@pytest.fixture
def stand_ins(monkeypatch):
    def open_ort(b, bundle, p, **o):
        return OnnxRuntimeEngine(bundle, p, **o) if p in ("fp32", "fp16") else _named("onnxruntime")(bundle, p, **o)

    ort = dataclasses.replace(registry.ONNXRUNTIME, precisions=("fp32", "fp16", "int8"), opener=open_ort)
    ov = dataclasses.replace(registry.ONNXRUNTIME, name="openvino", engine="openvino", label="openvino", providers=(),
                             precisions=("fp32", "bf16", "int8"), auto_rank=5, check=lambda d, p: (True, "stand-in"),
                             opener=lambda b, bundle, p, **o: _named("openvino")(bundle, p, **o), gpu=False)
    table = tuple(ort if b.name == "onnxruntime" else b for b in registry.BACKENDS if b.name != "openvino") + (ov,)
    monkeypatch.setattr(registry, "BACKENDS", table)
    monkeypatch.setattr(registry, "BY_NAME", {b.name: b for b in table})
    monkeypatch.setattr(registry, "NAMES", tuple(b.name for b in table))
    monkeypatch.setattr(registry, "ONNXRUNTIME", ort)
    monkeypatch.setattr(bench_mod, "BENCH_BACKENDS", ("authors", *(b.name for b in table)))
    monkeypatch.setattr(machine, "sgemm_rates", lambda threads, S=64, width=64, budget_s=0.4: dict(RATE, threads=threads))
    StandIn.opened = []
    return table


def test_pixelwise_flops_is_the_configs_math():
    # facades preset: channels [37, 64, 64, 64, 64, 3] -> 37*64 + 3*64*64 + 64*3 = 14848 multiply-adds a pixel
    fac = preset("facades")
    assert fac.mlp_channels == [37, 64, 64, 64, 64, 3]
    assert machine.pixelwise_flops(fac.mlp_channels, 1024 * 1024) == 2 * 1024 * 1024 * 14848  # 31.1 GFLOP
    c0 = CFG.n_label_channels + CFG.pe_channels
    assert machine.pixelwise_flops(CFG.mlp_channels, 3 * 16 * 16) == 2 * 3 * 16 * 16 * (c0 * 16 + 3 * 16 * 16 + 16 * 3)
    assert machine.sgemm_floor_ms(31.1e9, 100.0) == pytest.approx(311.0)


def test_sgemm_rates_measure_both_shapes():
    r = machine.sgemm_rates(1, S=16, width=16, budget_s=0.0)
    assert r["threads"] == 1 and "MatMul" in r["library"]
    assert r["square"]["a"] == [machine.SGEMM_SQUARE] * 2 and r["square"]["gflop"] == 2 * machine.SGEMM_SQUARE ** 3 / 1e9
    t = r["tiles"]
    assert t["tiles"] == machine.SGEMM_TILE_PIXELS // 256 and t["a"] == [t["tiles"], 256, 16] and t["b"] == [t["tiles"], 16, 16]
    assert t["gflop"] == 2 * machine.SGEMM_TILE_PIXELS * 16 * 16 / 1e9 and t["calls"] >= 3
    assert r["gflops"] == max(r["square"]["gflops"], t["gflops"]) > 0


def test_cpu_flags_are_those_of_cpuinfo():
    from pathlib import Path

    f = machine.cpu_flags()
    assert f["model"] == machine.cpu_model()
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags here")
    have = set(line.split(":", 1)[1].split())
    assert f["flags"] == [x for x in machine.CPU_FLAGS if x in have]


def test_plan_all_lists_every_precision_and_skips_what_the_bundle_lacks(stand_ins, bundle, monkeypatch):
    opts = BenchOptions(backends=["torch", "onnxruntime", "openvino"], precisions=["all"], **FAST)
    pairs, skipped = plan(opts, bundle)
    assert pairs == [("fp32", "authors"), ("fp32", "torch"), ("fp32", "onnxruntime"), ("fp32", "openvino"),
                     ("fp16", "onnxruntime"), ("bf16", "openvino")]
    assert [(s["backend"], s["precision"]) for s in skipped] == [("onnxruntime", "int8"), ("openvino", "int8")]
    assert all("asap quantize" in s["reason"] for s in skipped)
    monkeypatch.setattr(Bundle, "precisions", property(lambda self: ["fp32", "fp16", "int8"]))
    pairs, skipped = plan(opts, bundle)
    assert pairs[-2:] == [("int8", "onnxruntime"), ("int8", "openvino")] and skipped == []
    # the authors' baseline is measured once, first, at fp32, whatever precisions are asked
    pairs, skipped = plan(BenchOptions(backends=["torch", "onnxruntime"], precisions=["fp16"]))
    assert pairs == [("fp32", "authors"), ("fp16", "onnxruntime")]
    # a precision a backend's row does not list: nothing to measure, said (not a failed row)
    assert skipped == [{"backend": "torch", "precision": "fp16", "reason": "the torch backend runs fp32, not fp16"}]
    with pytest.raises(UsageError, match="unknown --precision 'int4'"):
        BenchOptions(precisions=["int4"]).check()


def test_bench_precision_all_rows_ratios_and_noisy_baseline(stand_ins, bundle, monkeypatch):
    monkeypatch.setattr(Bundle, "precisions", property(lambda self: ["fp32", "fp16", "int8"]))
    rep = run_bench(bundle, BenchOptions(backends=["onnxruntime", "openvino"], precisions=["all"], threads=1, **FAST))
    validate_report(rep)
    json.loads(json.dumps(rep))
    rows = rep["rows"]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    got = {(r["backend"], r["precision"]) for r in rows}
    assert got == {("authors", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8"),
                   ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")}
    assert {p for (_, p) in got} == {"fp32", "fp16", "bf16", "int8"}
    assert ("openvino", "bf16", 1) in StandIn.opened and ("onnxruntime", "int8", 1) in StandIn.opened  # --threads
    assert sum(r["backend"] == "authors" for r in rows) == 3  # once per stage, fp32
    base = {r["stage"]: r for r in rows if r["backend"] == "authors"}
    for r in rows:  # every precision against the one fp32 baseline, on medians and on best times
        b = base[r["stage"]]
        assert r["speedup_vs_authors"] == pytest.approx(b["median_ms"] / r["median_ms"])
        assert r["speedup_vs_authors_best"] == pytest.approx(b["min_ms"] / r["min_ms"])
        assert r["vs_authors"] == pytest.approx(r["median_ms"] / b["median_ms"])
        assert r["baseline_noisy"] is b["noisy"]
        f = r["fidelity"]  # thresholds of the row's own precision
        assert f["threshold"].startswith(f"PSNR >= {THRESHOLDS[r['precision']].psnr_db:g} dB") or r["stage"] == "predictor"
        if r["stage"] == "pixelwise":  # the sgemm floor at the stand-in rate
            flops = machine.pixelwise_flops(CFG.mlp_channels, 16 * 16)
            assert r["pixelwise_gflop"] == pytest.approx(flops / 1e9)
            assert r["sgemm_floor_ms"] == pytest.approx(flops / 50e9 * 1e3)
            assert r["vs_sgemm_floor"] == pytest.approx(r["median_ms"] / r["sgemm_floor_ms"])
        else:
            assert r["vs_sgemm_floor"] is None
    assert rep["machine"]["sgemm"]["gflops"] == 50.0 and rep["machine"]["sgemm"]["threads"] == 1
    assert isinstance(rep["machine"]["cpu_flags"]["flags"], list)
    assert "bf16" in {r["precision"] for r in rows if r["backend"] == "openvino"}
    md = to_markdown(rep)
    assert "speed-up best" in md and "vs sgemm floor" in md and "sgemm 50 GFLOP/s" in md
    assert "| openvino | bf16 | 16x16 | 1 | pixelwise |" in md
    # a noisy baseline: its ratios are marked, the warnings say so, not used silently
    for r in rows:  # the pixelwise baseline noisy, the others quiet (whatever this machine measured)
        if r["backend"] == "authors":
            r.update(cv=NOISY_CV * 3, noisy=True) if r["stage"] == "pixelwise" else r.update(cv=0.01, noisy=False)
    add_ratios(rows)
    rep["warnings"] = report_warnings(rep)
    validate_report(rep)
    marked = [r for r in rows if r["stage"] == "pixelwise"]
    assert all(r["baseline_noisy"] for r in marked) and not any(r["baseline_noisy"] for r in rows
                                                                if r["stage"] != "pixelwise")
    assert any("the authors' baseline is noisy at 16x16 batch 1 pixelwise" in w and "'*'" in w for w in rep["warnings"])
    md = to_markdown(rep)
    line = next(ln for ln in md.splitlines() if ln.startswith("| openvino | int8 | 16x16 | 1 | pixelwise |"))
    assert line.count("x*") == 2  # speed-up on medians and on best times, both marked
    assert "* ratio to a noisy authors' baseline row" in md
    cells = dict(zip(TERMINAL_COLUMNS, next(t for t, r in zip(table_rows(rep, TERMINAL_COLUMNS), rows) if r is marked[-1])))
    assert cells["speed-up"].endswith("x*") and cells["speed-up best"].endswith("x*")
    assert "(noisy baseline)" in row_line(marked[-1])


def test_cli_bench_precision_all_states_what_it_skipped(stand_ins, bundle, tmp_path):
    r = CliRunner().invoke(app, ["bench", "--bundle", str(bundle.path), "--size", "16", "-b", "onnxruntime,openvino",
                                 "--precision", "all", "--warmup", "0", "--iterations", "1", "--duration", "0",
                                 "--threads", "1", "--no-memory", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "skipped: onnxruntime int8:" in flat and "asap quantize" in flat and "skipped: openvino int8:" in flat
    assert "sgemm 50 GFLOP/s" in flat
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    validate_report(rep)
    assert {(s["backend"], s["precision"]) for s in rep["skipped"]} == {("onnxruntime", "int8"), ("openvino", "int8")}
    assert {r_["precision"] for r_ in rep["rows"]} == {"fp32", "fp16", "bf16"}

