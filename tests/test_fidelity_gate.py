"""The fidelity gate of issue 16: `asap validate --precision` for every precision of
asap_deploy/precisions.py, the share of pixels off by more than 8 levels, the bf16/int8 thresholds
(a result just inside each limit passes, just outside fails), and which backends each precision runs
(registry stand-ins: the table is replaced for the test, as tests/test_registry.py stands in for the
machine)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.engines import registry
from asap_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from asap_deploy.engines.validate import (OFF_LEVELS, STAGES, THRESHOLDS, failures, image_metrics, missing_graphs,
                                          share_over_levels, validation_backends)
from asap_deploy.errors import UsageError
from asap_deploy.export.bundle import Bundle, export_model, load_bundle
from asap_deploy.precisions import PRECISIONS
from asap_deploy.random_model import random_generator

runner = CliRunner()
CFG = ModelConfig(label_nc=5, crop_size=256, lr_width=8, lr_max_width=8, lr_depth=1)  # S=16


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return export_model(random_generator(CFG, 1), tmp_path_factory.mktemp("fg") / "b", fp16=False).path


# ---- the metric --------------------------------------------------------------------------------
def _share_over_8_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """Pixel by pixel, channel by channel: the oracle of share_over_8_levels."""
    n, h, w, c = a.shape
    off = 0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if any(abs(int(a[i, y, x, k]) - int(b[i, y, x, k])) > 8 for k in range(c)):
                    off += 1
    return off / (n * h * w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_share_over_8_levels_against_a_hand_count(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (2, 12, 10, 3)).astype(np.uint8)
    # differences spread over -12..12 (both sides of 8), clipped to 8 bits like a real output
    b = np.clip(a.astype(int) + rng.integers(-12, 13, a.shape), 0, 255).astype(np.uint8)
    want = _share_over_8_by_hand(a, b)
    assert 0.05 < want < 0.95  # the case is not degenerate
    assert share_over_levels(a, b) == pytest.approx(want, abs=0)
    assert OFF_LEVELS == 8 and share_over_levels(a, a) == 0.0
    # exactly 8 levels off is not counted, 9 is; one channel is enough
    c = a.copy()
    c[..., 1] = np.where(a[..., 1] < 128, a[..., 1] + 8, a[..., 1] - 8)
    assert share_over_levels(a, c) == 0.0
    c[0, 0, 0, 2] = a[0, 0, 0, 2] + 9 if a[0, 0, 0, 2] < 128 else a[0, 0, 0, 2] - 9
    assert share_over_levels(a, c) == pytest.approx(1 / (2 * 12 * 10))
    # image_metrics reports it next to the others
    f = lambda u8: (u8.astype(np.float32) / 127.5 - 1)  # noqa: E731
    m = image_metrics({"image": a, "image_float": f(a)}, {"image": b, "image_float": f(b)})
    assert m["share_over_8_levels"] == pytest.approx(want, abs=0)


# ---- the thresholds ----------------------------------------------------------------------------------
def test_every_precision_has_thresholds_and_the_fast_ones_are_judged_by_image_quality():
    assert set(THRESHOLDS) == set(PRECISIONS)
    for p in ("bf16", "int8"):
        t = THRESHOLDS[p]
        assert t.psnr_db >= 35.0  # issue 16's target on trained models
        assert t.mean_abs is not None and t.share_over_8_levels is not None and t.params_cosine < 1
        assert t.max_abs is None and t.max_levels is None and t.differing_share is None  # image quality, not elements


def _image(t, **over):
    """Metrics of an image stage exactly at every limit of `t` (None: a value far outside)."""
    m = {"finite": True, "max_abs": 2.0 if t.max_abs is None else t.max_abs,
         "mean_abs": 1.0 if t.mean_abs is None else t.mean_abs, "psnr_db": t.psnr_db,
         "differing_share": 1.0 if t.differing_share is None else t.differing_share,
         "share_over_8_levels": 1.0 if t.share_over_8_levels is None else t.share_over_8_levels,
         "max_levels": 255 if t.max_levels is None else t.max_levels}
    m.update(over)
    return m


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_limit_passes_just_inside_and_fails_just_outside(precision):
    t = THRESHOLDS[precision]
    for stage in ("pixelwise", "end_to_end"):
        assert failures(stage, _image(t), t) == []  # at the limits: passes
        for key, outside, inside in (("psnr_db", t.psnr_db - 0.01, t.psnr_db + 0.01),
                                     ("mean_abs", t.mean_abs * 1.01, t.mean_abs * 0.99),
                                     ("share_over_8_levels", t.share_over_8_levels + 1e-4,
                                      t.share_over_8_levels - 1e-4)):
            assert failures(stage, _image(t, **{key: inside}), t) == []
            fails = failures(stage, _image(t, **{key: outside}), t)
            assert len(fails) == 1 and fails[0].startswith(key), (key, fails)
        assert failures(stage, _image(t, finite=False), t) == ["non-finite output (NaN/Inf)"]
    c = t.params_cosine
    assert failures("predictor", {"finite": True, "cosine": c}, t) == []
    assert failures("predictor", {"finite": True, "cosine": c + 1e-6}, t) == []
    assert failures("predictor", {"finite": True, "cosine": c - 1e-6}, t)[0].startswith("cosine")


# ---- which backends each precision runs (registry stand-ins) ------------------------------------------
class StandIn(OnnxRuntimeEngine):
    """ONNX Runtime on the fp32 graphs, named as the stand-in backend, recording what it was asked for."""

    opened: list = []

    def __init__(self, bundle, precision="fp32", **kw):
        super().__init__(bundle, "fp32", **kw)
        self.asked = precision
        StandIn.opened.append((self.name, precision))

    def describe(self):
        return {**super().describe(), "precision": self.asked, "stand_in": "onnxruntime fp32"}


def _stand_in(name):
    return type(f"StandIn_{name}", (StandIn,), {"name": name})


@pytest.fixture
def stand_ins(monkeypatch):
    """The registry as issue 16 leaves it: onnxruntime runs int8 too, openvino runs fp32, bf16, int8
    (here both open a recording stand-in engine)."""
    ort = dataclasses.replace(registry.ONNXRUNTIME, precisions=("fp32", "fp16", "int8"),
                              opener=lambda b, bundle, p, **o: _stand_in("onnxruntime")(bundle, p))
    ov = dataclasses.replace(registry.ONNXRUNTIME, name="openvino", engine="openvino", label="openvino", providers=(),
                             precisions=("fp32", "bf16", "int8"), auto_rank=5, check=lambda d, p: (True, "stand-in"),
                             opener=lambda b, bundle, p, **o: _stand_in("openvino")(bundle, p))
    table = tuple(ort if b.name == "onnxruntime" else b for b in registry.BACKENDS if b.name != "openvino") + (ov,)
    monkeypatch.setattr(registry, "BACKENDS", table)
    monkeypatch.setattr(registry, "BY_NAME", {b.name: b for b in table})
    monkeypatch.setattr(registry, "ENGINE_NAMES", tuple(b.name for b in table if b.selectable))
    monkeypatch.setattr(registry, "ONNXRUNTIME", ort)
    StandIn.opened = []
    return table


def test_each_precision_picks_the_backends_that_run_it(stand_ins, monkeypatch):
    assert validation_backends([], "fp32") == ["onnxruntime"]
    assert validation_backends([], "int8") == ["onnxruntime"]
    assert validation_backends([], "bf16") == ["openvino"]  # the only one listing bf16
    assert validation_backends(["openvino", "onnxruntime"], "int8") == ["openvino", "onnxruntime"]
    with pytest.raises(UsageError, match=r"onnxruntime runs fp32, fp16, int8; bf16 runs on: openvino "
                                         r"\(pass --backend openvino\)"):
        validation_backends(["onnxruntime"], "bf16")
    with pytest.raises(UsageError, match=r"torch runs fp32; int8 runs on: onnxruntime, openvino"):
        validation_backends(["torch"], "int8")
    with pytest.raises(UsageError, match="unknown --precision 'int4'"):
        validation_backends([], "int4")
    ov = registry.BY_NAME["openvino"]
    monkeypatch.setitem(registry.BY_NAME, "openvino", dataclasses.replace(ov, check=lambda d, p: (False, "not installed")))
    monkeypatch.setattr(registry, "BACKENDS", tuple(registry.BY_NAME.values()))
    with pytest.raises(UsageError, match=r"--precision bf16: no backend can run it here \(openvino: not installed\)"):
        validation_backends([], "bf16")


def test_validate_bf16_runs_openvino_against_the_bf16_thresholds(stand_ins, bundle_dir, tmp_path):
    r = runner.invoke(app, ["validate", str(bundle_dir), "--precision", "bf16", "--random", "1",
                            "--report", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert StandIn.opened == [("openvino", "bf16")]
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["precision"] == "bf16" and list(data["backends"]) == ["openvino"]
    assert data["thresholds"] == THRESHOLDS["bf16"].describe()
    for stage in STAGES[1:]:
        assert "share_over_8_levels" in data["backends"]["openvino"]["stages"][stage]
    assert "> 8 levels" in r.output and "--backend openvino" in r.output


def test_int8_needs_the_graphs_of_asap_quantize(stand_ins, bundle_dir, tmp_path, monkeypatch):
    b = load_bundle(bundle_dir)
    assert missing_graphs(b, "fp32") is None and missing_graphs(b, "bf16") is None  # bf16 reads the fp32 graphs
    why = missing_graphs(b, "int8")
    assert why == (f"{bundle_dir} holds no int8 graphs (it holds fp32); write them with: asap quantize {bundle_dir} "
                   "--calib LABEL_MAPS")
    assert "re-export without --no-fp16" in missing_graphs(b, "fp16")
    r = runner.invoke(app, ["validate", str(bundle_dir), "--precision", "int8", "--random", "1",
                            "--report", str(tmp_path / "r")])
    assert r.exit_code == UsageError.exit_code and "asap quantize" in r.output, r.output
    assert StandIn.opened == [] and not (tmp_path / "r").exists()  # refused before any work
    # a bundle holding int8 graphs: every backend listing int8 that was asked for runs at int8
    monkeypatch.setattr(Bundle, "precisions", property(lambda self: ["fp32", "int8"]))
    r = runner.invoke(app, ["validate", str(bundle_dir), "--precision", "int8", "--random", "1", "-b", "onnxruntime",
                            "-b", "openvino", "--report", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert StandIn.opened == [("onnxruntime", "int8"), ("openvino", "int8")]
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["precision"] == "int8" and set(data["backends"]) == {"onnxruntime", "openvino"}
    assert data["thresholds"] == THRESHOLDS["int8"].describe()


def test_validate_refuses_a_backend_without_the_precision(bundle_dir):
    r = runner.invoke(app, ["validate", str(bundle_dir), "--precision", "bf16", "-b", "torch"])
    assert r.exit_code == UsageError.exit_code and "torch runs fp32" in r.output, r.output
    r = runner.invoke(app, ["validate", str(bundle_dir), "--precision", "fp8"])
    assert r.exit_code == UsageError.exit_code and "choose from: fp32, fp16, bf16, int8" in r.output
