"""The OpenVINO backend (engines/openvino_engine.py) against the PyTorch reference: fp32 per stage at
asap validate's fp32 thresholds (batch > 1, non-square maps, the tiled pixelwise path), bf16 within a
fidelity bound that a wrong engine fails, the same input errors as the other engines, a tampered
graph refused before OpenVINO reads it, `auto`'s choices per precision (the machine stood in for),
and an install without openvino (one line naming the extra) or without torch (it still runs)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from asap_deploy.config import ModelConfig
from asap_deploy.engines import IMAGE, IMAGE_FLOAT, create_engine, registry
from asap_deploy.engines.registry import Source, choose_backend
from asap_deploy.engines.validate import THRESHOLDS, failures, image_metrics, params_metrics
from asap_deploy.errors import BundleError, InputError, UsageError
from asap_deploy.export.bundle import export_model, load_bundle
from asap_deploy.random_model import random_generator, random_label_maps

ov = pytest.importorskip("openvino", reason="the openvino backend needs openvino (pip install 'asap-deploy[openvino]')")

from asap_deploy.engines import openvino_engine  # noqa: E402
from asap_deploy.engines.openvino_engine import OpenVinoEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# 9 labels + don't care, instance edges, reflection padding: every input path of the graphs. S=16.
CFG = ModelConfig(label_nc=9, contain_dontcare_label=True, instance_edges=True, crop_size=256, learned_ds_factor=8,
                  lr_width=8, lr_max_width=16, lr_depth=2, reflection_pad=True)
FP32 = THRESHOLDS["fp32"]
runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(export_model(random_generator(CFG, 2), tmp_path_factory.mktemp("ov") / "b", fp16=False).path)


@pytest.fixture(scope="module")
def torch_ref(bundle):
    return create_engine("torch", bundle)


@pytest.fixture(scope="module")
def engine(bundle):
    return create_engine("openvino", bundle)


def _bf16_here() -> bool:
    return "BF16" in openvino_engine.cpu_capabilities()


# ---- fp32 against the PyTorch reference, per stage --------------------------------------------------
@pytest.mark.parametrize("n,h,w,seed", [(2, 32, 48, 1), (3, 64, 32, 2), (1, 80, 112, 3)])
def test_fp32_stages_match_the_torch_reference(engine, torch_ref, n, h, w, seed):
    labels, inst = random_label_maps(CFG, n, h, w, seed=seed)
    labels[0, :16, :16] = 255  # don't care
    want_p = torch_ref.predict_params(labels, inst)
    got_p = engine.predict_params(labels, inst)
    assert got_p.dtype == np.float32 and got_p.shape == want_p.shape == (n, CFG.num_params, h // 16, w // 16)
    m = params_metrics(want_p, got_p)
    assert failures("predictor", m, FP32) == [] and m["max_abs"] < 1e-3, m
    # pixelwise from the reference's own grid, then end to end
    for stage, want, got in (("pixelwise", torch_ref.pixelwise(labels, want_p), engine.pixelwise(labels, want_p)),
                             ("end_to_end", torch_ref.generate(labels, inst), engine.generate(labels, inst))):
        assert got[IMAGE].dtype == np.uint8 and got[IMAGE_FLOAT].dtype == np.float32
        assert got[IMAGE].shape == got[IMAGE_FLOAT].shape == (n, h, w, 3)
        assert 0.05 < np.abs(want[IMAGE_FLOAT]).mean() < 0.9  # a varied, unsaturated image: the test can fail
        m = image_metrics(want, got)
        assert failures(stage, m, FP32) == [], (stage, m)
    assert np.array_equal(engine.run(labels, inst), got[IMAGE])


@pytest.mark.parametrize("pixels_per_run", [16 * 16, 3 * 16 * 16, 64 * 16, 64 * 48])
def test_tiled_pixelwise_equals_one_run_and_torch(bundle, engine, torch_ref, pixels_per_run):
    """Above the pixel budget: the predictor once, the pixelwise graph in blocks of whole tiles
    (single tiles, runs of tiles, bands of tile rows, whole images) -- the bytes of one run."""
    labels, inst = random_label_maps(CFG, 2, 64, 48, seed=7)
    capped = OpenVinoEngine(bundle, pixels_per_run=pixels_per_run)
    got = capped.generate(labels, inst)
    one = engine.generate(labels, inst)  # 2x64x48 is below the default budget: one run of asap.onnx
    assert set(capped._requests) == {"predictor", "pixelwise"} and "asap" in engine._requests
    assert np.array_equal(got[IMAGE], one[IMAGE])
    np.testing.assert_allclose(got[IMAGE_FLOAT], one[IMAGE_FLOAT], atol=1e-5)
    assert failures("end_to_end", image_metrics(torch_ref.generate(labels, inst), got), FP32) == []


def test_small_maps_behave_like_onnxruntime(bundle, engine):
    """Reflection padding needs 2 pixels at every level: the smallest maps fail in both runtimes,
    as an InputError naming the shape; the next size up runs in both and agrees."""
    ort = create_engine("onnxruntime", bundle)
    too_small = np.zeros((1, 16, 16), np.uint8), np.zeros((1, 16, 16), np.int32)
    with pytest.raises(InputError, match=r"ONNX Runtime could not run asap on label maps of shape 1x16x16"):
        ort.generate(*too_small)
    with pytest.raises(InputError, match=r"OpenVINO could not run asap on label maps of shape 1x16x16 \(N x H x W\): "
                                         r".*REFLECT padding"):
        engine.generate(*too_small)
    labels, inst = random_label_maps(CFG, 1, 32, 32, seed=5)
    a, b = engine.generate(labels, inst), ort.generate(labels, inst)
    assert np.abs(a[IMAGE_FLOAT] - b[IMAGE_FLOAT]).max() < 1e-4


# ---- bf16 ----------------------------------------------------------------------------------------
BF16_PSNR_DB, BF16_COSINE = 30.0, 0.99  # loose: measured 44.6 dB / 0.99997 on this model (Xeon, avx512_bf16)


def _bf16_fidelity(ref_img, got_img, ref_p, got_p) -> list[str]:
    out = []
    m = image_metrics(ref_img, got_img)
    if m["psnr_db"] < BF16_PSNR_DB:
        out.append(f"PSNR {m['psnr_db']:.1f} dB")
    if params_metrics(ref_p, got_p)["cosine"] < BF16_COSINE:
        out.append(f"params cosine {params_metrics(ref_p, got_p)['cosine']:.4f}")
    return out


@pytest.mark.skipif(not _bf16_here(), reason="this CPU has no bf16 units (OpenVINO reports no BF16)")
def test_bf16_is_close_to_fp32_and_really_bf16(bundle, engine):
    bf = create_engine("openvino", bundle, "bf16")
    labels, inst = random_label_maps(CFG, 2, 64, 96, seed=3)
    ref_img, ref_p = engine.generate(labels, inst), engine.predict_params(labels, inst)
    got_img, got_p = bf.generate(labels, inst), bf.predict_params(labels, inst)
    assert got_img[IMAGE].dtype == np.uint8 and got_img[IMAGE_FLOAT].dtype == np.float32 and got_p.dtype == np.float32
    assert _bf16_fidelity(ref_img, got_img, ref_p, got_p) == []
    # it runs in bf16 (an engine that ignored the hint would give the fp32 bytes)
    assert str(bf._compiled["asap"].get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    assert image_metrics(ref_img, got_img)["differing_share"] > 0.01
    assert bf.describe()["inference_precision_hint"] == "bf16" and bf.describe()["graphs"] == "fp32"
    # a wrong engine fails the same bound: labels read one class off (a wrong one-hot channel order)
    shifted = labels.copy()
    shifted[shifted < 9] = (shifted[shifted < 9] + 1) % 9
    wrong_img, wrong_p = bf.generate(shifted, inst), bf.predict_params(shifted, inst)
    assert len(_bf16_fidelity(ref_img, wrong_img, ref_p, wrong_p)) == 2


def test_bf16_refused_on_a_cpu_without_bf16_units(bundle, monkeypatch):
    monkeypatch.setattr(openvino_engine, "cpu_capabilities", lambda core=None: ["FP32", "FP16", "INT8", "BIN"])
    with pytest.raises(UsageError, match=r"^--precision bf16 on the openvino backend: this CPU has no bf16 units: "
                                         r"OpenVINO reports FP32, FP16, INT8, BIN for it, no BF16 \(bf16 needs "
                                         r"AVX512_BF16 or AMX units, else run fp32 or int8\)$"):
        OpenVinoEngine(bundle, "bf16")


# ---- precisions, options, errors ------------------------------------------------------------------
def test_int8_without_quantized_graphs_says_to_run_quantize(bundle):
    with pytest.raises(BundleError, match=r"no int8 graphs in this bundle .*; write int8 graphs with: asap quantize "
                                          rf"{bundle.path} --calib MAPS"):
        create_engine("openvino", bundle, "int8")
    with pytest.raises(UsageError, match="the openvino backend runs fp32, bf16, int8, not 'fp16'"):
        OpenVinoEngine(bundle, "fp16")


# ---- int8: the graphs `asap quantize` writes ------------------------------------------------------------
Q_CFG = ModelConfig(label_nc=7, crop_size=256, lr_width=16, lr_max_width=32, lr_depth=2, reflection_pad=True)  # S=16


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """A small bundle quantized by `asap quantize`'s library call (4 calibration maps, 2 held out;
    written whatever its random weights score at the gate)."""
    from asap_deploy.app.quantize import QuantizeRequest, run_quantize
    from asap_deploy.io import write_png

    root = tmp_path_factory.mktemp("ov8")
    export_model(random_generator(Q_CFG, 7), root / "b", fp16=False)
    (root / "maps").mkdir()
    for i in range(6):
        write_png(root / "maps" / f"m{i}.png", random_label_maps(Q_CFG, 1, 96, 128, seed=300 + i)[0][0])
    s = run_quantize(root / "b", QuantizeRequest(calib=[root / "maps"], samples=4, holdout=2, force=True,
                                                 sensitivity="never"))
    assert s.written
    return load_bundle(root / "b")


def _runtime_precisions(compiled, layer_type: str) -> list[str]:
    """The precision OpenVINO's CPU plugin runs each layer of `layer_type` in (u8/i8: int8 kernels)."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) == layer_type:
            out.append(info["runtimePrecision"].astype(str))
    return out


def test_int8_runs_the_quantized_graphs_like_onnxruntime(int8_bundle):
    """Against ONNX Runtime on the same int8 graphs (a second backend): near identical; OpenVINO's
    fp32 run of the fp32 graphs is not (the bound tells the two apart); Convs run in int8 kernels."""
    b = int8_bundle
    o8, r8, o32 = create_engine("openvino", b, "int8"), create_engine("onnxruntime", b, "int8"), OpenVinoEngine(b)
    labels, _ = random_label_maps(Q_CFG, 2, 64, 96, seed=3)
    ref_img, ref_p = r8.generate(labels), r8.predict_params(labels)
    for eng, close in ((o8, True), (o32, False)):
        img, p = eng.generate(labels), eng.predict_params(labels)
        assert img[IMAGE].dtype == np.uint8 and img[IMAGE_FLOAT].dtype == np.float32 and p.dtype == np.float32
        ok = image_metrics(ref_img, img)["psnr_db"] >= 38.0 and params_metrics(ref_p, p)["cosine"] >= 0.9995
        assert ok is close, (eng.precision, image_metrics(ref_img, img), params_metrics(ref_p, p))
    assert o8.describe()["graphs"] == "int8" and o8.describe()["inference_precision_hint"] == "f32"
    assert "u8" in _runtime_precisions(o8._compiled["asap"], "Convolution")
    assert set(_runtime_precisions(o32._compiled["asap"], "Convolution")) == {"f32"}
    # above the pixel budget: predictor.int8 + pixelwise.int8 in blocks, the bytes of asap.int8 in one run
    # within one 8-bit level (2/255 on the [-1, 1] scale), not bit-equal: asap.int8 in one run and the stage
    # graphs in blocks are different OpenVINO graphs; with the pixelwise MLP in fp32 (quantize's default) the
    # predictor's uint8 activations reach the MLP through differently fused kernels (measured up to 2.1e-3)
    tiled = OpenVinoEngine(b, "int8", pixels_per_run=16 * 16).generate(labels)
    np.testing.assert_allclose(tiled[IMAGE_FLOAT], o8.generate(labels)[IMAGE_FLOAT], atol=2 / 255)


def test_int8_availability_reads_the_bundle(int8_bundle, bundle):
    assert registry.OPENVINO.available(int8_bundle.path, "int8") == (True, f"int8 graphs in {int8_bundle.path}")
    assert choose_backend("openvino", Source(bundle=int8_bundle.path), "int8").backend == "openvino"
    with pytest.raises(UsageError, match=rf"openvino: no int8 graphs in {bundle.path} \(it holds fp32\); write "
                                         rf"them with: asap quantize {bundle.path} --calib MAPS"):
        choose_backend("auto", Source(bundle=bundle.path), "int8")


def test_threads_and_describe(bundle):
    e = create_engine("openvino", bundle, intra_op_threads=1)
    labels, inst = random_label_maps(CFG, 1, 32, 32, seed=1)
    e.generate(labels, inst)
    assert int(e._compiled["asap"].get_property("INFERENCE_NUM_THREADS")) == 1
    d = e.describe()
    assert d["backend"] == "openvino" and d["threads"] == 1 and d["openvino"] == ov.__version__
    assert d["inference_precision_hint"] == "f32" and "FP32" in d["cpu_capabilities"]
    assert str(e._compiled["asap"].get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    with pytest.raises(UsageError, match="pixels_per_run must be >= 1"):
        OpenVinoEngine(bundle, pixels_per_run=0)


@pytest.mark.parametrize("labels,inst,message", [
    (np.full((1, 16, 16), 10, np.uint8), True, "label id 10 is out of range: this model takes ids 0..9 or 255"),
    (np.zeros((1, 16, 20), np.uint8), True, "multiples of S=16"),
    (np.zeros((16, 16), np.uint8), True, r"must be \(N, H, W\)"),
    (np.zeros((1, 16, 16), np.float32), True, "integer ids"),
    (np.zeros((1, 32, 32), np.uint8), False, "instance map is required"),
    (np.zeros((1, 32, 32), np.uint8), np.zeros((1, 32, 16), np.int32), "differs from label shape"),
])
def test_bad_inputs_give_the_errors_of_the_other_engines(engine, torch_ref, labels, inst, message):
    instances = np.zeros(labels.shape, np.int32) if inst is True else (inst if inst is not False else None)
    for e in (engine, torch_ref):
        with pytest.raises(InputError, match=message):
            e.generate(labels, instances)
    with pytest.raises(InputError, match=r"parameter grid has shape \(1, 3, 2, 2\), expected"):
        engine.pixelwise(np.zeros((1, 32, 32), np.uint8), np.zeros((1, 3, 2, 2), np.float32))


def test_a_tampered_graph_is_refused_before_openvino_reads_it(bundle, tmp_path, monkeypatch):
    shutil.copytree(bundle.path, tmp_path / "b")
    b = load_bundle(tmp_path / "b")
    e = OpenVinoEngine(b)
    seen = []
    real = e._core.read_model
    monkeypatch.setattr(e, "_core", type("Spy", (), {"read_model": lambda s, *a: seen.append(a) or real(*a),
                                                     "compile_model": e._core.compile_model})())
    f = tmp_path / "b" / "asap.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed (inside a weight)
    f.write_bytes(bytes(data))
    labels, inst = random_label_maps(CFG, 1, 32, 32, seed=1)
    with pytest.raises(BundleError, match=rf"{f}: sha256 .* does not match the manifest"):
        e.generate(labels, inst)
    assert seen == []
    e.predict_params(labels, inst)  # the untouched predictor.onnx still compiles, from its checked bytes
    assert len(seen) == 1 and isinstance(seen[0][0], bytes)


def test_a_graph_openvino_cannot_compile_is_a_bundle_error_naming_the_file(bundle, monkeypatch):
    import onnx
    from onnx import helper

    node = helper.make_node("NoSuchOp", ["labels"], ["params"], domain="nowhere")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("labels", onnx.TensorProto.UINT8, [1])],
                          [helper.make_tensor_value_info("params", onnx.TensorProto.FLOAT, [1])])
    bad = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("nowhere", 1)])
    e = OpenVinoEngine(bundle)
    monkeypatch.setattr(e.bundle, "graph_model", lambda graph, precision: bad)
    with pytest.raises(BundleError, match=rf"^{bundle.path / 'predictor.onnx'}: OpenVINO [\d.]+ cannot compile this "
                                          r"graph .*NoSuchOp"):
        e.predict_params(np.zeros((1, 32, 32), np.uint8), np.zeros((1, 32, 32), np.int32))


# ---- the registry and auto --------------------------------------------------------------------------
@pytest.fixture
def machine(monkeypatch):
    """Stand in for the machine: no GPU backend usable, ONNX Runtime CPU, torch and OpenVINO (and
    the bundle's int8 graphs) as `state` says."""
    state = {"ort": True, "ov": True, "caps": ("FP32", "BF16", "INT8"), "int8": False, "torch": True}
    monkeypatch.setattr(registry, "_ort_providers", lambda: ["CPUExecutionProvider"] if state["ort"] else [])
    monkeypatch.setattr(registry, "_openvino_installed", lambda: state["ov"])
    monkeypatch.setattr(registry, "_openvino_capabilities", lambda: tuple(state["caps"]))
    monkeypatch.setattr(registry, "bundle_holds", lambda d, p: (p != "int8" or state["int8"], f"{p} graphs (stand-in)"))
    monkeypatch.setattr(registry, "_torch_ok", lambda: (state["torch"], "" if state["torch"] else "PyTorch missing"))
    rows = [dataclasses.replace(b, check=lambda d, p: (False, "no GPU")) if b.gpu else b for b in registry.BACKENDS]
    monkeypatch.setattr(registry, "BACKENDS", tuple(rows))
    monkeypatch.setattr(registry, "BY_NAME", {b.name: b for b in rows})
    return state


def test_registry_row():
    b = registry.OPENVINO
    assert (b.name, b.engine, b.precisions, b.scale, b.gpu, b.providers) == (
        "openvino", "openvino", ("fp32", "bf16", "int8"), True, False, ())
    assert all("openvino" in names for names in (registry.ENGINE_NAMES, registry.CHOICES, registry.SCALE_ENGINES))
    cpu = ("onnxruntime", "openvino", "torch")
    order = lambda p: [x.name for x in registry.auto_order(p) if x.name in cpu]  # noqa: E731
    # measured (the registry's comment): ONNX Runtime first in fp32, OpenVINO first in int8
    assert order("fp32") == ["onnxruntime", "openvino", "torch"]
    assert order("int8") == ["openvino", "onnxruntime", "torch"]
    assert b.available(None, "fp16") == (False, "runs fp32, bf16, int8, not fp16")


@pytest.mark.parametrize("precision,state,want,skipped", [
    ("fp32", {}, "onnxruntime", []),
    ("fp32", {"ort": False}, "openvino", ["onnxruntime: not installed"]),
    ("fp32", {"ort": False, "ov": False}, "torch", ["onnxruntime: not installed",
                                                    "openvino: not installed (pip install 'asap-deploy[openvino]')"]),
    ("bf16", {}, "openvino", ["onnxruntime: runs fp32, fp16, int8, not bf16"]),
    ("bf16", {"caps": ("FP32", "INT8")}, None, ["onnxruntime: runs fp32, fp16, int8, not bf16",
                                                "openvino: this CPU has no bf16 units: OpenVINO reports FP32, INT8",
                                                "torch: runs fp32, not bf16"]),
    ("int8", {"int8": True}, "openvino", []),
    ("int8", {"int8": True, "ov": False}, "onnxruntime", ["openvino: not installed (pip install 'asap-deploy[openvino]')"]),
    ("int8", {}, None, ["openvino: int8 graphs (stand-in)", "onnxruntime: int8 graphs (stand-in)",
                        "torch: runs fp32, not int8"]),
])
def test_auto_picks_per_precision(machine, tmp_path, precision, state, want, skipped):
    machine.update(state)
    src = Source(bundle=tmp_path)
    if want is None:
        with pytest.raises(UsageError, match="no backend can run this bundle") as ei:
            choose_backend("auto", src, precision)
        got = ei.value.message.split(": ", 1)[1].split("; ")
    else:
        c = choose_backend("auto", src, precision)
        assert c.backend == want and c.reason, c
        got = c.skipped
    gpu = {b.label for b in registry.BACKENDS if b.gpu}
    got = [s for s in got if s.split(":")[0] not in gpu]
    assert len(got) == len(skipped) and all(g.startswith(s) for g, s in zip(got, skipped)), got


def test_explicit_backend_must_run_the_precision(machine, tmp_path):
    src = Source(bundle=tmp_path)
    assert choose_backend("openvino", src, "bf16").backend == "openvino"
    with pytest.raises(UsageError, match=r"^--precision bf16: the onnxruntime backend runs fp32, fp16, int8; bf16 runs "
                                         r"on openvino$"):
        choose_backend("onnxruntime", src, "bf16")
    with pytest.raises(UsageError, match=r"^--precision fp16: the openvino backend runs fp32, bf16, int8; fp16 runs "
                                         r"on "):
        choose_backend("openvino", src, "fp16")


def test_availability_on_this_machine(bundle):
    ok, why = registry.OPENVINO.available()
    assert ok and why == "openvino installed"
    assert registry.OPENVINO.available(bundle.path, "fp32") == (True, f"fp32 graphs in {bundle.path}")
    assert registry.OPENVINO.available(bundle.path, "int8") == (
        False, f"no int8 graphs in {bundle.path} (it holds fp32); write them with: asap quantize {bundle.path} "
               "--calib MAPS")
    assert registry.OPENVINO.available(None, "bf16")[0] == _bf16_here()
    from asap_deploy.app.doctor import run_checks, usable_backends

    checks = run_checks()
    c = next(c for c in checks if c.name == "openvino")
    assert c.status == "ok" and c.version and "FP32" in c.detail
    assert usable_backends(checks)["openvino"].startswith("yes (fp32")


# ---- the commands ------------------------------------------------------------------------------------
def test_infer_and_validate_run_on_openvino(bundle, tmp_path):
    from asap_deploy.cli import app
    from asap_deploy.io import read_rgb, write_png

    labels, _ = random_label_maps(CFG, 1, 48, 64, seed=11)
    inst = np.zeros_like(labels, dtype=np.uint8)
    inst[0, :, 32:] = 1
    write_png(tmp_path / "a.png", labels[0])
    write_png(tmp_path / "a_inst.png", inst[0])
    r = runner.invoke(app, ["infer", str(tmp_path / "a.png"), "--bundle", str(bundle.path), "-b", "openvino",
                            "--instances", str(tmp_path / "a_inst.png"), "--threads", "1", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "backend: openvino (--backend openvino)" in r.output
    got = read_rgb(tmp_path / "o" / "a.png")
    want = create_engine("onnxruntime", bundle).run(labels, inst.astype(np.int32))[0]
    assert np.abs(got.astype(int) - want).max() <= 1
    r = runner.invoke(app, ["validate", str(bundle.path), "-b", "openvino", "--random", "1",
                            "--report", str(tmp_path / "val")])
    assert r.exit_code == 0, r.output
    assert "openvino" in r.output and "FAIL" not in r.output


def _run_blocked(module: str, code: str) -> subprocess.CompletedProcess:
    pre = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "COLUMNS": "300"})


def test_without_openvino_one_line_names_the_extra(bundle):
    code = (
        "from asap_deploy.export.bundle import load_bundle\n"
        "from asap_deploy.engines import create_engine, registry\n"
        "from asap_deploy.errors import MissingDependencyError\n"
        "print('AVAILABLE', registry.OPENVINO.available())\n"
        f"b = load_bundle({str(bundle.path)!r})\n"
        "try:\n"
        "    create_engine('openvino', b)\n"
        "except MissingDependencyError as e:\n"
        "    print('ERROR', e.exit_code, e.message)\n"
    )
    r = _run_blocked("openvino", code)
    assert r.returncode == 0, r.stderr
    assert "AVAILABLE (False, \"not installed (pip install 'asap-deploy[openvino]')\")" in r.stdout
    assert ("ERROR 6 the openvino backend needs openvino, which is not installed: pip install "
            "'asap-deploy[openvino]'") in r.stdout


def test_runs_without_torch(bundle):
    code = (
        "import numpy as np\n"
        "from asap_deploy.export.bundle import load_bundle\n"
        "from asap_deploy.engines import create_engine\n"
        f"e = create_engine('openvino', load_bundle({str(bundle.path)!r}))\n"
        "img = e.run(np.ones((2, 32, 48), np.uint8), np.zeros((2, 32, 48), np.int32))\n"
        "assert img.shape == (2, 32, 48, 3) and img.dtype == np.uint8\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )
    r = _run_blocked("torch", code)
    assert r.returncode == 0, r.stderr
