"""`asap demo`, `asap make-data` and `asap train` end to end with tiny budgets."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from asap_deploy.checkpoints import load_generator
from asap_deploy.cli import app
from asap_deploy.app.demo import run_demo
from asap_deploy.errors import OutputError
from asap_deploy.io import MARKER, read_label_map, read_rgb
from asap_deploy.train.trainer import read_train_state

runner = CliRunner()


def said(text: str, r) -> bool:
    """`text` appears in the command's output, ignoring where rich wrapped the lines."""
    return "".join(text.split()) in "".join(r.output.split())


def test_demo_writes_what_it_promises(tmp_path):
    out = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--out", str(out), "--steps", "2", "--minutes", "5", "--bench-size", "32",
                            "--bench-duration", "0.05"])
    assert r.exit_code == 0, r.output
    for name in ("loss_curve.png", "results_grid.png", "quality.json", "run/model.pt", "run/losses.jsonl",
                 "data/dataset.json", "results/label_00.png", "results/compare_07.png", "bundle/manifest.json",
                 "validation/report.json", "scale_grid.png", "bench/report.json", "bench/latency.png", "index.html"):
        assert (out / name).is_file(), name
        if not name.startswith(("data/", "results/", "bundle/", "validation/")):  # folders listed as a whole
            assert said(name.split("/")[-1], r), name
    assert said("results/label_00..07.png (8 label maps", r) and said("results/compare_00..07.png (8 label |", r)
    q = json.loads((out / "quality.json").read_text())
    assert q["steps"] == 2 and set(q) >= {"psnr_model", "psnr_class_mean", "psnr_constant_mean"}
    assert said("held-out PSNR", r)
    lab = read_label_map(out / "results" / "label_00.png")
    row = read_rgb(out / "results" / "compare_00.png")
    assert lab.shape == (64, 64) and row.shape == (64, 3 * 64 + 4, 3)  # label | generated | target
    # the target panel is the held-out image itself
    np.testing.assert_array_equal(row[:, -64:], read_rgb(out / "data" / "val_img" / "000000.png"))
    model, ck = load_generator(out / "run" / "model.pt")
    assert ck.config.label_nc == 6 and ck.config.S == 4
    # the pipeline after training: validation passed, infer at scale 1/2/4, bench rows, one page linking it all
    assert json.loads((out / "validation" / "report.json").read_text())["passed"] is True
    assert said("ONNX Runtime vs PyTorch: PASSED", r)
    for k in (1, 2, 4):
        assert read_rgb(out / "infer" / f"scale{k}" / "000000.png").shape == (64 * k, 64 * k, 3)
    bench = json.loads((out / "bench" / "report.json").read_text())
    assert {r_["backend"] for r_ in bench["rows"]} >= {"authors", "torch", "onnxruntime"}
    # the bench step runs with `asap bench`'s settings (not the training's 1 thread) and says them
    from asap_deploy.engines.bench import BenchOptions, default_threads
    from asap_deploy.engines.bench_report import settings_text

    d = BenchOptions()
    o = bench["options"]
    assert (o["warmup_s"], o["min_iters"], o["threads"], o["stages"]) == (d.warmup_s, d.min_iters, None, d.stages)
    assert o["min_seconds"] == 0.05 and bench["threads"] == default_threads()
    assert {r_["threads"] for r_ in bench["rows"]} == {default_threads()}
    assert said(f"settings of `asap bench --size 32`: {settings_text(bench)}", r)
    assert said(f"bench settings (those of `asap bench --size 32`): {settings_text(bench)}", r)
    from html import escape

    assert escape(settings_text(bench)) in (out / "index.html").read_text()
    assert said("[1/9] authors fp32 32x32 batch 1 predictor: median", r)  # a line per finished row
    page = (out / "index.html").read_text()
    import re

    for src in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert (out / src).is_file(), src
    check_report_page(page, out)
    assert not list(out.rglob(".*.tmp")) and not [p for p in out.rglob(".*") if p.is_file() and p.name != MARKER]


class _Tables(HTMLParser):
    """The tables of a page as rows of cell texts, plus the text of every <pre>."""

    def __init__(self):
        super().__init__()
        self.tables, self.pres, self._cell, self._pre = [], [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._pre = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data):
        for buf in (self._cell, self._pre):
            if buf is not None:
                buf.append(data)


def check_report_page(page: str, out: Path) -> None:
    """index.html: validation as a table with its thresholds (no raw JSON), readable grid names,
    labelled panels and a labelled scale grid."""
    parser = _Tables()
    parser.feed(page)
    (table,) = [t for t in parser.tables if t and "PSNR dB" in t[0]]
    header = table[0]
    assert header[:2] == ["backend", "stage"] and "parameter cosine" in header and header[-1] == "result"
    threshold = dict(zip(header, table[1]))
    assert threshold["backend"] == "threshold"
    assert threshold["PSNR dB"] == ">= 60.0" and threshold["max 8-bit levels"] == "<= 1"
    assert threshold["parameter cosine"].startswith(">= 0.99999")
    rows = {(r[0], r[1]): dict(zip(header, r)) for r in table[2:]}
    assert set(rows) == {("onnxruntime", s) for s in ("predictor", "pixelwise", "end-to-end")}
    assert all(r["result"] == "ok" for r in rows.values())
    assert float(rows[("onnxruntime", "end-to-end")]["PSNR dB"]) >= 60
    assert not any('"backends"' in p or '"stages"' in p or "{" in p for p in parser.pres)  # no JSON dump
    assert '"stages"' not in page and "&quot;stages&quot;" not in page
    # readable grid names, one shown on the page; labelled panels (a white header with dark text)
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids and all(re.fullmatch(r"sample\d\d_map\d+_onnxruntime\.png", g) for g in grids), grids
    assert f'src="validation/{grids[0]}"' in page
    for name in (f"validation/{grids[0]}", "scale_grid.png"):
        img = read_rgb(out / name)
        head = img[:20]
        assert (head > 200).mean() > 0.8, name  # white header band
        dark = np.nonzero((head < 128).all(axis=-1).any(axis=0))[0]
        quarter = img.shape[1] // 4
        assert all(((dark >= i * quarter) & (dark < (i + 1) * quarter)).any() for i in range(4)), name  # 4 titles


def test_demo_library_time_budget(tmp_path):
    events = []
    res = run_demo(tmp_path / "d", minutes=0.001, steps=None, on_event=lambda kind, **kw: events.append(kind),
                   bench_size=32, bench_seconds=0.0)
    assert res["steps"] >= 0 and events[0] == "stage" and "train_start" in events and "train_end" in events
    assert events.count("stage") == 8 and Path(res["files"][-1]).name == "index.html"
    # a second demo replaces the first (its own files) ...
    res2 = run_demo(tmp_path / "d", minutes=0.001, steps=None, bench_size=32, bench_seconds=0.0)
    assert Path(res2["files"][-1]).is_file()
    # ... but never a folder holding a file of the user's, before any work
    (tmp_path / "d" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="notes.txt"):
        run_demo(tmp_path / "d", minutes=0.001, steps=None, on_event=lambda kind, **kw: pytest.fail("work started"))
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep"


def test_make_data_then_train_then_resume(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    r = runner.invoke(app, ["make-data", str(data), "--n", "6", "--n-val", "2", "--size", "32", "--classes", "3"])
    assert r.exit_code == 0, r.output
    assert said("wrote 6 training and 2 held-out pairs", r)
    base = ["train", "--data", str(data), "--out", str(run), "--batch-size", "2", "--ndf", "8", "--save-every", "1",
            "--l1-weight", "10", "--set", "lr_width=4", "--set", "lr_max_width=8", "--set", "lr_depth=1"]
    r = runner.invoke(app, base + ["--steps", "2"])
    assert r.exit_code == 0, r.output
    assert said("trained 2 steps (total 2)", r)
    state = read_train_state(run / "train_state.pt")
    assert state["config"]["label_nc"] == 3 and state["config"]["crop_size"] == 32 and state["config"]["lr_width"] == 4
    assert state["options"]["lambda_l1"] == 10.0
    r = runner.invoke(app, base + ["--steps", "2"])
    assert r.exit_code == 2 and said("--resume", r)  # refuses to overwrite a run
    r = runner.invoke(app, ["train", "--out", str(run), "--resume", "--steps", "3", "--set", "lr_depth=2"])
    assert r.exit_code == 2 and said("cannot change the model of a resumed run", r)
    r = runner.invoke(app, ["train", "--out", str(run), "--resume", "--steps", "3", "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert said("trained 1 steps (total 3)", r)
    assert [json.loads(x)["step"] for x in (run / "losses.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_train_errors_are_one_line_with_exit_codes(tmp_path):
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
                            "--preset", "facades", "--steps", "1"])
    assert r.exit_code == 5 and said("missing: no such dataset folder", r)
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "1"])
    assert r.exit_code == 3 and said("--preset or --config", r)
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--preset", "facades"])
    assert r.exit_code == 2 and said("--steps or --minutes", r)
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--preset", "facades", "--steps", "1",
                            "--set", "nonsense=1", "--data", str(tmp_path)])
    assert r.exit_code == 3 and said("nonsense", r)
    r = runner.invoke(app, ["make-data", str(tmp_path / "d"), "--size", "40"])
    assert r.exit_code == 2 and said("multiple of 16", r)
    assert "Traceback" not in r.output
