"""asap validate: metrics, thresholds, report folder, exit codes, refusal of tampered bundles."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from asap_deploy.checkpoints import save_generator
from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.engines import IMAGE, IMAGE_FLOAT, create_engine
from asap_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from asap_deploy.engines.validate import (THRESHOLDS, cosine, folder_samples, psnr_u8, random_samples,
                                          validate)
from asap_deploy.errors import OutputError
from asap_deploy.export.bundle import load_bundle
from asap_deploy.random_model import random_generator, random_label_maps
from asap_deploy.io import write_png
from conftest import authors_fixture_dir

runner = CliRunner()
CFG = ModelConfig(label_nc=7, instance_edges=True, crop_size=512, aspect_ratio=2.0, lr_width=8, lr_max_width=8,
                  lr_depth=1)  # S=16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "model.pt"
    save_generator(random_generator(CFG, 3), path)
    return path


@pytest.fixture(scope="module")
def bundle_dir(checkpoint):
    out = checkpoint.parent / "bundle"
    r = runner.invoke(app, ["export", str(checkpoint), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_metrics_against_direct_formulas():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] ^= 1
    mse = 1 / a.size
    assert psnr_u8(a, b) == pytest.approx(10 * np.log10(255**2 / mse))
    assert psnr_u8(a, a) == 100.0
    x = rng.normal(size=50)
    assert cosine(x, 2 * x) == pytest.approx(1.0)
    assert cosine(x, -x) == pytest.approx(-1.0)


def test_random_maps_are_blobs_not_noise():
    labels, inst = random_label_maps(CFG, 2, 64, 128, seed=0)
    assert labels.dtype == np.uint8 and inst.dtype == np.int32
    same_right = (labels[:, :, 1:] == labels[:, :, :-1]).mean()
    assert same_right > 0.9  # regions, not noise
    assert all(len(np.unique(m)) >= 2 for m in labels)
    assert labels.max() < CFG.n_label_channels


def test_random_samples_cover_sizes_and_batches():
    samples = random_samples(CFG, 5)
    shapes = [s.labels.shape for s in samples]
    assert sum(s[0] for s in shapes) == 5
    assert any(s[0] > 1 for s in shapes) and any(s[1] != s[2] for s in shapes) and any(s[1] > s[2] for s in shapes)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_validate_passes_and_writes_report(bundle_dir, tmp_path, precision):
    report = tmp_path / "report"
    r = runner.invoke(app, ["validate", str(bundle_dir), "--random", "3", "--precision", precision,
                            "--report", str(report)])
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output
    data = json.loads((report / "report.json").read_text())
    assert data["passed"] and data["precision"] == precision
    assert data["thresholds"] == THRESHOLDS[precision].describe()
    stages = data["backends"]["onnxruntime"]["stages"]
    assert set(stages) == {"predictor", "pixelwise", "end_to_end"}
    if precision == "fp32":
        assert stages["end_to_end"]["max_abs"] <= 1e-3 and stages["predictor"]["cosine"] > 0.99999
    assert len(list(report.glob("*_onnxruntime.png"))) == 3  # one grid per label map
    # readable names, listed per sample in report.json next to the sample's source
    names = sorted(p.name for p in report.glob("*.png"))
    assert all(re.fullmatch(r"sample\d\d_map\d+_onnxruntime\.png", n) for n in names), names
    assert sorted(n for row in data["samples"] for n in row["pictures"]["onnxruntime"]) == names


def _header_text_columns(grid: np.ndarray, header_h: int) -> np.ndarray:
    """Columns of the header band that hold dark (text) pixels."""
    return np.nonzero((grid[:header_h] < 128).all(axis=-1).any(axis=0))[0]


def test_comparison_grid_has_labelled_panels_and_a_readable_heat_map():
    from asap_deploy.engines.validate import LINE_PX, comparison_grid

    labels, _ = random_label_maps(CFG, 1, 64, 96, seed=1)
    ref = np.random.default_rng(0).integers(0, 256, (64, 96, 3)).astype(np.uint8)
    got = ref.copy()
    got[10:20, 30:40] = np.clip(got[10:20, 30:40].astype(int) + 2, 0, 255).astype(np.uint8)  # 2 levels off there
    grid = comparison_grid(labels[0], ref, got, CFG, backend="onnxruntime")
    header_h = 4 + 2 * LINE_PX  # title + note lines
    k = 2  # 96-px panels are enlarged x2 (at least 160 px) so that the titles fit
    panel_w, gap = 96 * k, 4
    assert grid.shape[1] == 4 * panel_w + 3 * gap
    head = grid[:header_h]
    assert (head > 200).mean() > 0.8  # a white header band ...
    cols = _header_text_columns(grid, header_h)
    for i in range(4):  # ... with a title over each of the four panels
        x0 = i * (panel_w + gap)
        assert ((cols >= x0) & (cols < x0 + panel_w)).any(), f"panel {i} has no title"
    # the heat map panel: black where equal, bright where 2 levels differ (x32 -> 64 on the scale)
    heat = grid[header_h:header_h + 64 * k, 3 * (panel_w + gap):]
    assert heat[:10 * k].max() < 20
    assert heat[10 * k:20 * k, 30 * k:40 * k].mean() > 40
    # the colour scale bar under it runs from dark to bright
    bar = grid[-2, 3 * (panel_w + gap):]
    assert bar[:5].mean() < 40 and bar[-5:].mean() > 150
    # four different titles (not one repeated stamp)
    titles = [head[:LINE_PX, i * (panel_w + gap):i * (panel_w + gap) + panel_w] for i in range(4)]
    assert len({t.tobytes() for t in titles}) == 4


class NoisyEngine(OnnxRuntimeEngine):
    """ONNX Runtime with a deliberate error in the pixelwise output: validation must catch it."""

    def _generate(self, labels, instances):
        out = super()._generate(labels, instances)
        f = out[IMAGE_FLOAT] + 0.05
        return {IMAGE_FLOAT: f, IMAGE: np.clip(np.rint((f + 1) * 127.5), 0, 255).astype(np.uint8)}


def test_validate_fails_on_a_wrong_backend(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    ref = create_engine("torch", bundle)
    rep = validate(bundle, ref, [NoisyEngine(bundle)], random_samples(CFG, 2), "fp32", tmp_path / "r")
    assert not rep.passed
    fails = rep.backends["onnxruntime"]["failures"]
    assert any(f.startswith("end_to_end: max_abs") for f in fails)
    assert not any(f.startswith("pixelwise") for f in fails)
    assert json.loads((tmp_path / "r" / "report.json").read_text())["passed"] is False


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"validation work started ({name})")


def test_validate_refuses_a_report_path_it_would_clobber_before_any_work(bundle_dir, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    (tmp_path / "like_a_report").mkdir()  # holding "a" report.json is no proof that asap wrote the folder
    (tmp_path / "like_a_report" / "report.json").write_text("{}")
    (tmp_path / "like_a_report" / "mine.txt").write_text("keep")
    for out in (tmp_path / "notes", tmp_path / "file", tmp_path / "like_a_report", bundle_dir, bundle_dir.parent):
        r = runner.invoke(app, ["validate", str(bundle_dir), "--random", "1", "--report", str(out)])
        assert r.exit_code == OutputError.exit_code, r.output
        assert str(out) in "".join(r.output.split())
        with pytest.raises(OutputError, match="not write|not a folder|replace the input"):  # before any engine runs
            validate(load_bundle(bundle_dir), Untouchable(), [Untouchable()], random_samples(CFG, 1), "fp32", out)
    assert (tmp_path / "notes" / "mine.txt").read_text() == (tmp_path / "file").read_text() == "keep"
    assert (tmp_path / "like_a_report" / "mine.txt").read_text() == "keep"
    load_bundle(bundle_dir)  # untouched


def test_validate_with_label_folder_and_checkpoint(bundle_dir, checkpoint, tmp_path):
    labels, inst = random_label_maps(CFG, 3, 32, 64, seed=9)
    d = tmp_path / "labels"
    for i in range(3):
        write_png(d / f"label_{i}.png", labels[i])
        write_png(d / f"instance_{i}.png", inst[i].astype(np.uint16))
    samples = folder_samples(CFG, d)
    assert [s.labels.shape for s in samples] == [(3, 32, 64)]
    r = runner.invoke(app, ["validate", str(bundle_dir), "--labels", str(d), "--checkpoint", str(checkpoint),
                            "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output


def test_validate_refuses_tampered_bundle(bundle_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    f = bad / "asap.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    r = runner.invoke(app, ["validate", str(bad), "--random", "1"])
    assert r.exit_code == 8
    assert "asap.onnx" in r.output and "does not match the manifest" in r.output


def test_validate_rejects_bad_choices(bundle_dir):
    r = runner.invoke(app, ["validate", str(bundle_dir), "--backend", "onnxruntim"])
    assert r.exit_code == 2 and "did you mean 'onnxruntime'" in r.output
    r = runner.invoke(app, ["validate", str(bundle_dir), "--precision", "int4"])
    assert r.exit_code == 2 and "unknown --precision 'int4'" in r.output


def test_validate_authors_fixture_end_to_end(tmp_path):
    d = authors_fixture_dir("cityscapes_s16")
    out = tmp_path / "b"
    r = runner.invoke(app, ["export", str(d / "latest_net_G.pth"), "-o", str(out), "--no-fp16"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["validate", str(out), "--labels", str(d), "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
