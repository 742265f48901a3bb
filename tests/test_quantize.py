"""asap quantize (issue 16, INT8): int8 graphs against the fp32 graphs, the bundle update (atomic,
hashes, quantization object), the fidelity gate and --force, the bad inputs of the issue, Ctrl-C,
tampering, re-quantizing, the ONNX Runtime int8 engine, and the QDQ surgery the sensitivity scan
uses (against ONNX Runtime's own quantizer)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.engines import build as eb
from asap_deploy.engines import quantize as q
from asap_deploy.engines import registry
from asap_deploy.engines import validate as val
from asap_deploy.engines.base import IMAGE, IMAGE_FLOAT
from asap_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
from asap_deploy.engines.validate import cosine, psnr_u8
from asap_deploy.errors import BundleError
from asap_deploy.export.bundle import MANIFEST, check_graph_matches_config, export_model, load_bundle
from asap_deploy.random_model import random_generator, random_label_maps

runner = CliRunner()
# S=16; an MLP of 5 layers 16 wide (1251 grid parameters per tile); Convs of 7..32 channels: fast to
# quantize and run
CFG = ModelConfig(label_nc=7, instance_edges=False, crop_size=256, aspect_ratio=1.0, lr_width=16, lr_max_width=32,
                  lr_depth=2, hr_width=16, hr_depth=5)
LAX = dataclasses.replace(val.THRESHOLDS["int8"], psnr_db=10.0, mean_abs=0.2, share_over_8_levels=0.9,
                          params_cosine=0.5)
STRICT = dataclasses.replace(val.THRESHOLDS["int8"], psnr_db=99.0)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """name -> (sha256, mtime_ns) of every file in a folder (the marker included)."""
    return {p.name: (sha(p), p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def temps_next_to(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).parent.iterdir() if "asaptmp" in p.name]


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qb") / "bundle"
    export_model(random_generator(CFG, 7), out, fp16=False)
    return out


@pytest.fixture(scope="module")
def maps_dir(tmp_path_factory) -> Path:
    """8 label PNGs (ids as gray values), 64..128 px, two of them not multiples of S=16."""
    d = tmp_path_factory.mktemp("maps")
    sizes = [(128, 128), (96, 128), (128, 96), (100, 120), (128, 128), (64, 112), (112, 64), (128, 128)]
    for i, (h, w) in enumerate(sizes):
        lab, _ = random_label_maps(CFG, 1, h, w, seed=300 + i)
        cv2.imwrite(str(d / f"map{i}.png"), lab[0])
    return d


def copy_bundle(src: Path, tmp_path: Path, name: str = "bundle") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def quantize_cli(bundle: Path, maps: Path, *extra: str, thresholds=LAX, monkeypatch=None):
    if monkeypatch is not None and thresholds is not None:
        monkeypatch.setitem(val.THRESHOLDS, "int8", thresholds)
    return runner.invoke(app, ["quantize", str(bundle), "--calib", str(maps), "--samples", "4", "--holdout", "2",
                               *extra])


@pytest.fixture(scope="module")
def quantized(fp32_bundle, maps_dir, tmp_path_factory):
    """(bundle folder quantized by the CLI with lax thresholds, its files before, the CLI output)."""
    d = copy_bundle(fp32_bundle, tmp_path_factory.mktemp("quantized"))
    before = snapshot(d)
    mp = pytest.MonkeyPatch()
    try:
        r = quantize_cli(d, maps_dir, "--pixelwise", "int8", monkeypatch=mp)
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    return d, before, r.output


def maps_for(cfg: ModelConfig, n: int, h: int, w: int, seed: int) -> list[q.CalibrationMap]:
    out = []
    for i in range(n):
        lab, inst = random_label_maps(cfg, 1, h, w, seed=seed + i)
        out.append(q.CalibrationMap(f"r{seed + i}", hashlib.sha256(lab.tobytes()).hexdigest(), lab[0],
                                    None if inst is None else inst[0], (h, w)))
    return out


# ---- fidelity: the int8 graphs vs the fp32 graphs ------------------------------------------------------
def test_int8_engine_tracks_fp32_and_a_broken_scale_does_not(quantized):
    """The int8 graphs, run by the ONNX Runtime engine on fresh random maps, stay close to the fp32
    graphs, within bounds a broken quantization misses: the same graphs with the activation ranges
    of a bad calibration (each 1/8 of the calibrated range: saturation) fall below them."""
    d, _, _ = quantized
    b = load_bundle(d)
    labels = np.concatenate([random_label_maps(CFG, 1, 128, 128, seed=900 + i)[0] for i in range(2)])
    with OnnxRuntimeEngine(b, "fp32") as e32, OnnxRuntimeEngine(b, "int8") as e8:
        p32, p8 = e32.predict_params(labels), e8.predict_params(labels)
        img32, img8 = e32.run(labels), e8.run(labels)
        pix8 = e8.pixelwise(labels, p32)[IMAGE]
    # measured: cosine 0.9989, PSNR 46.0 dB end to end, 53.5 dB pixelwise, mean 0.9 levels; the broken
    # calibration below: cosine 0.76, 22.7 dB
    assert cosine(p32, p8) > 0.995
    assert psnr_u8(img32, img8) > 38
    assert psnr_u8(img32, pix8) > 45  # the int8 MLP fed the fp32 grid
    assert np.abs(img32.astype(int) - img8).mean() < 2

    broken = onnx.load(str(d / "predictor.int8.onnx"))
    scales = [t for t in broken.graph.initializer if t.name.endswith("_scale") and not t.dims]
    assert scales
    for t in scales:  # per-tensor (activation) scales
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / 8, t.name))
    s_bad = ort.InferenceSession(broken.SerializeToString(), providers=["CPUExecutionProvider"])
    p_bad = s_bad.run(["params"], {"labels": labels})[0]
    with OnnxRuntimeEngine(b, "fp32") as e32:
        img_bad = e32.pixelwise(labels, p_bad)[IMAGE]
    assert cosine(p32, p_bad) < 0.995 and psnr_u8(img32, img_bad) < 38


def test_int8_graphs_keep_the_node_and_agree_with_each_other(quantized):
    """pixelwise.int8.onnx keeps the SpatialMLP node with the config's attributes and holds QDQ
    MatMuls inside its function; asap.int8.onnx run whole equals the int8 predictor + pixelwise."""
    d, _, _ = quantized
    b = load_bundle(d)
    for g in ("pixelwise", "asap"):
        m = onnx.load(str(d / f"{g}.int8.onnx"))
        check_graph_matches_config(d / f"{g}.int8.onnx", b.config, m)
        fn = next(f for f in m.functions if f.name == "SpatialMLP")
        ops = [n.op_type for n in fn.node]
        assert ops.count("QuantizeLinear") >= 5 and ops.count("MatMul") == 5
    pred = onnx.load(str(d / "predictor.int8.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in pred.graph.node) >= 2
    labels = random_label_maps(CFG, 1, 64, 96, seed=5)[0]
    with OnnxRuntimeEngine(b, "int8", pixels_per_run=1 << 30) as whole, \
            OnnxRuntimeEngine(b, "int8", pixels_per_run=1) as split:
        a, s = whole.generate(labels), split.generate(labels)
    assert np.abs(a[IMAGE].astype(int) - s[IMAGE]).max() <= 1


def test_manifest_records_files_and_quantization(quantized, maps_dir):
    d, before, out = quantized
    m = json.loads((d / MANIFEST).read_text())
    assert m["precisions"] == ["fp32", "int8"] and m["schema_version"] == 1
    for g in ("predictor", "pixelwise", "asap"):
        name = f"{g}.int8.onnx"
        assert m["graphs"][g]["files"]["int8"] == name
        assert m["files"][name] == {"sha256": sha(d / name), "bytes": (d / name).stat().st_size,
                                    "precision": "int8", "graph": g}
    for name, (digest, mtime) in before.items():  # the fp32 files: byte-identical, times kept
        if name not in (MANIFEST, ".asap-deploy.json"):
            assert (sha(d / name), (d / name).stat().st_mtime_ns) == (digest, mtime), name
    qz = m["quantization"]
    assert qz["method"] == "ort-minmax" and qz["tool"]["name"] == "onnxruntime.quantization"
    assert qz["tool"]["version"] == ort.__version__ and qz["samples"] == 4 == len(qz["calibration_maps"])
    for entry in qz["calibration_maps"] + qz["evaluation_maps"]:
        png = maps_dir / entry["name"]
        assert entry["sha256"] == sha(png)
        assert entry["size"] == list(cv2.imread(str(png), cv2.IMREAD_UNCHANGED).shape)
    assert not {e["name"] for e in qz["calibration_maps"]} & {e["name"] for e in qz["evaluation_maps"]}
    assert qz["evaluated_on"].startswith("held-out") and len(qz["evaluation_maps"]) == 2
    assert {n["op_type"] for n in qz["int8_nodes"]} == {"Conv", "MatMul"}
    convs = [n.name for n in onnx.load(str(d / "predictor.onnx")).graph.node if n.op_type == "Conv"]
    int8_convs = [n["name"] for n in qz["int8_nodes"] if n["op_type"] == "Conv"]
    assert sorted(int8_convs + [n["name"] for n in qz["float_nodes"]]) == sorted(convs)
    assert qz["fidelity"]["passed"] is True and qz["fidelity"]["forced"] is False
    assert qz["fidelity"]["stages"]["end_to_end"]["psnr_db"] > 38  # the gate's own numbers, recorded
    assert set(qz["fidelity"]["stages"]) == {"predictor", "pixelwise", "end_to_end"}
    marker = json.loads((d / ".asap-deploy.json").read_text())
    assert set(marker["files"]) == set(m["files"]) | {MANIFEST}
    assert not temps_next_to(d)
    assert "PASSED" in out and "end_to_end" in out


def test_heavy_layers_hold_most_of_the_work(fp32_bundle):
    """conv_work: weight size x output positions (checked by hand for one Conv); `heavy` takes the
    largest until >= 90%; --keep-float names are checked."""
    m = load_bundle(fp32_bundle).graph_model("predictor")
    convs = q.conv_work(m, 128, 64)
    first = convs[0]
    w = next(t for t in m.graph.initializer if t.name == f"{first.name}.weight")
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    out_name = next(n.output[0] for n in m.graph.node if n.name == first.name)
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run([out_name], {"labels": random_label_maps(CFG, 1, 128, 64)[0]})[0]
    assert first.macs == int(np.prod(w.dims)) * y.shape[2] * y.shape[3]
    int8, fp = q.select_layers(convs, "heavy", ())
    total = sum(c.macs for c in convs)
    share = sum(c.macs for c in convs if c.name in int8) / total
    assert share >= q.HEAVY_SHARE and fp
    smallest_int8 = min(c.macs for c in convs if c.name in int8)
    assert all(c.macs <= smallest_int8 for c in convs if c.name in fp)
    assert q.select_layers(convs, "all", ())[1] == []
    assert q.select_layers(convs, "all", (convs[0].name,))[1] == [convs[0].name]
    with pytest.raises(q.UsageError, match="is not a Conv node of the predictor"):
        q.select_layers(convs, "heavy", ("lowres_stream.model.99",))


# ---- the gate, --force, re-quantizing -------------------------------------------------------------------
def test_failing_gate_writes_nothing_unless_forced(fp32_bundle, maps_dir, tmp_path, monkeypatch):
    d = copy_bundle(fp32_bundle, tmp_path)
    before = snapshot(d)
    r = quantize_cli(d, maps_dir, thresholds=STRICT, monkeypatch=monkeypatch)
    assert r.exit_code == 9, r.output
    assert "nothing written" in r.output and "psnr_db" in r.output and "recovers dB" in r.output
    assert snapshot(d) == before and load_bundle(d).precisions == ["fp32"] and not temps_next_to(d)
    r = quantize_cli(d, maps_dir, "--force", thresholds=STRICT, monkeypatch=monkeypatch)
    assert r.exit_code == 0, r.output
    assert "FORCED" in r.output
    qz = load_bundle(d).manifest["quantization"]
    assert qz["fidelity"]["passed"] is False and qz["fidelity"]["forced"] is True
    assert any("psnr_db" in f for f in qz["fidelity"]["failures"])
    rows = qz["sensitivity"]["rows"]
    assert rows and [r["gain_db"] for r in rows] == sorted((r["gain_db"] for r in rows), reverse=True)


def test_requantize_needs_overwrite_and_keeps_the_rest(quantized, maps_dir, tmp_path, monkeypatch):
    d = copy_bundle(quantized[0], tmp_path)
    before = snapshot(d)
    r = quantize_cli(d, maps_dir, monkeypatch=monkeypatch)
    assert r.exit_code == 12 and "already holds int8 graphs" in r.output and "--overwrite" in r.output
    assert snapshot(d) == before
    r = quantize_cli(d, maps_dir, "--overwrite", "--seed", "5", "--json", monkeypatch=monkeypatch)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)  # --json: stdout is the JSON alone
    assert report["written"] and report["quantization"]["seed"] == 5
    after = snapshot(d)
    for name in ("predictor.onnx", "pixelwise.onnx", "asap.onnx"):
        assert after[name] == before[name]
    assert after["predictor.int8.onnx"][0] != before["predictor.int8.onnx"][0]  # another calibration subset
    b = load_bundle(d)
    assert b.manifest["quantization"]["seed"] == 5 and b.precisions == ["fp32", "int8"]


def test_ctrl_c_during_calibration_leaves_the_bundle(fp32_bundle, maps_dir, tmp_path, monkeypatch):
    d = copy_bundle(fp32_bundle, tmp_path)
    before = snapshot(d)
    calls = []
    real = q.CalibrationReader.get_next

    def interrupted(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(q.CalibrationReader, "get_next", interrupted)
    r = quantize_cli(d, maps_dir, monkeypatch=monkeypatch)
    assert r.exit_code == 130 and "interrupted" in r.output and len(calls) == 2
    assert snapshot(d) == before and not temps_next_to(d)
    assert load_bundle(d).precisions == ["fp32"]


def test_ctrl_c_while_writing_leaves_the_bundle(fp32_bundle, quantized, tmp_path, monkeypatch):
    """An interrupt while the new bundle is being copied, or between the two renames of the swap,
    leaves the old bundle as it was (add_precision with the graphs of an earlier run)."""
    from asap_deploy import io as io_mod
    from asap_deploy.export import bundle as bundle_mod

    src = load_bundle(quantized[0])
    graphs = {g: (quantized[0] / f"{g}.int8.onnx").read_bytes() for g in ("predictor", "pixelwise", "asap")}
    d = copy_bundle(fp32_bundle, tmp_path)
    before = snapshot(d)
    real_copy, real_replace = bundle_mod._copy_checked, io_mod.replace_dir

    def copy(*a, **k):
        if a[0].name == "pixelwise.onnx":
            raise KeyboardInterrupt
        return real_copy(*a, **k)

    def replace(new, target):  # the old bundle moved aside, then Ctrl-C before the new one is in place
        old = Path(str(target) + ".aside")
        os.replace(target, old)
        try:
            raise KeyboardInterrupt
        finally:
            os.replace(old, target)

    for name, fn in (("_copy_checked", copy), ("replace_dir", replace)):
        monkeypatch.setattr(bundle_mod if name == "_copy_checked" else io_mod, name, fn)
        with pytest.raises(KeyboardInterrupt):
            bundle_mod.add_precision(d, "int8", graphs, src.manifest["quantization"])
        monkeypatch.setattr(bundle_mod, "_copy_checked", real_copy)
        monkeypatch.setattr(io_mod, "replace_dir", real_replace)
        assert snapshot(d) == before and not temps_next_to(d), name
        assert load_bundle(d).precisions == ["fp32"]
    b = bundle_mod.add_precision(d, "int8", graphs, src.manifest["quantization"])  # and it works uninterrupted
    assert b.precisions == ["fp32", "int8"] and sha(d / "asap.int8.onnx") == sha(quantized[0] / "asap.int8.onnx")


def test_tampered_int8_file_is_refused(quantized, tmp_path):
    d = copy_bundle(quantized[0], tmp_path)
    f = d / "pixelwise.int8.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"pixelwise\.int8\.onnx: sha256 .* does not match the manifest"):
        load_bundle(d)
    b = load_bundle(d, verify=False)  # engines read the checked bytes: refused there too
    labels = random_label_maps(CFG, 1, 64, 64)[0]
    with OnnxRuntimeEngine(b, "int8") as e, pytest.raises(BundleError, match="does not match the manifest"):
        e.pixelwise(labels, np.zeros((1, CFG.num_params, 4, 4), np.float32))


# ---- bad inputs ------------------------------------------------------------------------------------------
def test_bad_inputs(fp32_bundle, quantized, maps_dir, tmp_path, monkeypatch):
    d = copy_bundle(fp32_bundle, tmp_path)
    before = snapshot(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_png = tmp_path / "txt"
    no_png.mkdir()
    (no_png / "a.txt").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    lab = random_label_maps(CFG, 1, 64, 64, seed=1)[0][0].copy()
    lab[10, 20] = 200  # an id of another label set
    cv2.imwrite(str(other / "foreign.png"), lab)
    cases = [
        (["--calib", str(empty)], 5, "folder holds no .png files"),
        (["--calib", str(no_png)], 5, "folder holds no .png files"),
        (["--calib", str(tmp_path / "missing")], 5, "no such file or folder"),
        (["--calib", str(other)], 5, r"foreign\.png: label id 200 at x=20, y=10 is out of range"),
        (["--calib", str(maps_dir), "--samples", "0"], 2, r"--samples must be in 1\.\.256"),
        (["--calib", str(maps_dir), "--samples", "257"], 2, r"--samples must be in 1\.\.256"),
        (["--calib", str(maps_dir), "--holdout", "-1"], 2, r"--holdout must be in 0\.\.64"),
        (["--calib", str(maps_dir), "--method", "ort-minmx"], 2, "did you mean 'ort-minmax'"),
        (["--calib", str(maps_dir), "--keep-float", "conv9"], 2, "is not a Conv node of the predictor"),
        (["--calib", str(maps_dir), "--layers", "most"], 2, "unknown --layers"),
        ([], 2, "no calibration maps"),
    ]
    for args, code, message in cases:
        r = runner.invoke(app, ["quantize", str(d), *args])
        assert r.exit_code == code, (args, r.output)
        assert __import__("re").search(message, " ".join(r.output.split())), (args, r.output)
    assert snapshot(d) == before
    r = runner.invoke(app, ["quantize", str(tmp_path / "nobundle"), "--calib", str(maps_dir)])
    assert r.exit_code == 8 and "no such bundle folder" in r.output
    r = runner.invoke(app, ["quantize", str(quantized[0]), "--calib", str(maps_dir)])
    assert r.exit_code == 12 and "already holds int8 graphs" in r.output


def test_nncf_missing_is_one_line_naming_the_extra(fp32_bundle, maps_dir, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_nncf(name, *a, **k):
        if name == "nncf" or name.startswith("nncf."):
            raise ImportError("No module named 'nncf'", name="nncf")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    r = runner.invoke(app, ["quantize", str(fp32_bundle), "--calib", str(maps_dir), "--method", "nncf"])
    assert r.exit_code == 6
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "pip install 'asap-deploy[openvino]'" in r.output


def test_maps_are_read_and_padded_as_infer_reads_them(fp32_bundle, maps_dir):
    from asap_deploy.app.infer import decode_label_map
    from asap_deploy.app.quantize import QuantizeRequest, choose, find_maps, read_map
    from asap_deploy.palette import load_palette

    b = load_bundle(fp32_bundle)
    pal = load_palette(None, b.config, b.manifest)
    p = maps_dir / "map3.png"  # 100 x 120
    m = read_map(p, b.config, pal, QuantizeRequest(calib=[p]))
    raw = decode_label_map(p, b.config, pal)
    assert m.size == (100, 120) and m.labels.shape == (112, 128)
    assert np.array_equal(m.labels, b.config.pad_to_tiles(raw)) and m.sha256 == sha(p)
    paths = find_maps([maps_dir])
    a = choose(paths, 3, 2, seed=1)
    assert a == choose(list(reversed(paths)), 3, 2, seed=1)  # the order they were named in does not matter
    assert len(a[0]) == 3 and len(a[1]) == 2 and not set(a[0]) & set(a[1])
    assert choose(paths, 3, 2, seed=2) != a
    assert choose(paths[:2], 8, 4, seed=0) == (sorted(paths[:2], key=str)[::-1], []) or len(choose(paths[:2], 8, 4, 0)[0]) == 2


def test_few_maps_gate_on_the_calibration_maps(fp32_bundle, maps_dir, tmp_path, monkeypatch):
    d = copy_bundle(fp32_bundle, tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(maps_dir / "map0.png", one / "map0.png")
    monkeypatch.setitem(val.THRESHOLDS, "int8", LAX)
    r = runner.invoke(app, ["quantize", str(d), "--calib", str(one)])  # default: pixelwise kept fp32
    assert r.exit_code == 0, r.output
    qz = load_bundle(d).manifest["quantization"]
    assert qz["evaluated_on"].startswith("the calibration maps") and qz["fidelity"]["held_out"] is False
    assert qz["samples"] == 1 and qz["pixelwise"].startswith("fp32 (pixelwise kept fp32: ")
    assert {n["op_type"] for n in qz["int8_nodes"]} == {"Conv"}
    assert {"graph": "pixelwise", "name": "SpatialMLP", "op_type": "SpatialMLP"} in qz["float_nodes"]
    assert "fewer than --samples" in r.output
    # pixelwise kept fp32: its int8 file is the fp32 graph
    assert onnx.load(str(d / "pixelwise.int8.onnx")).functions[0] == onnx.load(str(d / "pixelwise.onnx")).functions[0]


# ---- engines and registry ------------------------------------------------------------------------------
def test_onnxruntime_runs_int8_through_the_registry(quantized, fp32_bundle):
    d = quantized[0]
    assert "onnxruntime" in registry.usable_backends(d, "int8")
    ok, why = registry.ONNXRUNTIME.available(fp32_bundle, "int8")
    assert not ok and "asap quantize" in why
    with registry.create_engine("onnxruntime", load_bundle(d), "int8") as e:
        assert e.run(random_label_maps(CFG, 1, 64, 64, seed=2)[0]).shape == (1, 64, 64, 3)
    with pytest.raises(BundleError, match="no int8 graphs in this bundle.*asap quantize"):
        OnnxRuntimeEngine(load_bundle(fp32_bundle), "int8")


# ---- manifest checks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("quantization"), "no 'quantization' object"),
    (lambda m: m["quantization"].update(samples="4"), "quantization.samples must be a whole number"),
    (lambda m: m["quantization"]["calibration_maps"][0].update(sha256="abc"), r"calibration_maps\[0\] must hold"),
    (lambda m: m["quantization"].update(int8_nodes="Conv"), "quantization.int8_nodes must list nodes"),
    (lambda m: m["quantization"].update(tool={"name": "x"}), "quantization.tool must name the tool"),
    (lambda m: m["quantization"]["fidelity"].update(passed="yes"), "quantization.fidelity must be an object"),
    (lambda m: m["quantization"].update(note="x" * 5000), "a string of 5000 characters"),
    (lambda m: m["quantization"].update(deep=[[[[[[[[1]]]]]]]]), "nested deeper than"),
    (lambda m: m.update(precisions=["fp32"]), "describes int8 graphs the manifest does not list"),
])
def test_quantization_object_is_checked_on_load(quantized, tmp_path, edit, message):
    d = copy_bundle(quantized[0], tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    edit(m)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        load_bundle(d, verify=False)


def test_old_bundles_still_load(fp32_bundle):
    b = load_bundle(fp32_bundle)
    assert b.precisions == ["fp32"] and "quantization" not in b.manifest


# ---- the pieces: QDQ surgery against ONNX Runtime's quantizer, Pad moves, expanded function ------------
def test_keep_conv_in_float_equals_quantizing_without_it(fp32_bundle):
    """The sensitivity scan's surgery (one Conv back to fp32 inside the quantized graph) computes
    what ONNX Runtime's quantizer makes when told to leave that Conv out (same ranges)."""
    b = load_bundle(fp32_bundle)
    pred = b.graph_model("predictor")
    feeds = [m.feeds() for m in maps_for(CFG, 3, 64, 64, 40)]
    convs = [c.name for c in q.conv_work(pred, 64, 64)]
    quantized = q.ort_quantize(pred, q.CalibrationReader(feeds), "minmax", op_types=["Conv"])
    target = convs[len(convs) // 2]
    surgery = q.keep_conv_in_float(quantized, pred, target)
    excluded = q.ort_quantize(pred, q.CalibrationReader(feeds), "minmax", op_types=["Conv"], exclude=[target])
    x = feeds[0]["labels"]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        ["params"], {"labels": x})[0]
    a, b_, full = run(surgery), run(excluded), run(quantized)
    assert np.abs(a - b_).max() <= 1e-4 * max(1.0, np.abs(b_).max())
    assert np.abs(a - full).max() > 10 * np.abs(a - b_).max()  # the surgery changed something
    names = {n["name"] for n in q.int8_nodes(surgery, "predictor")}
    assert target not in names and set(convs) - {target} == names


def test_move_dq_after_pads_is_exact_and_fusable():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
        helper.make_node("Pad", ["xd", "pads"], ["xp"], name="pad", mode="reflect"),
        helper.make_node("Conv", ["xp", "w"], ["y"], name="conv"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                           numpy_helper.from_array(np.array(128, np.uint8), "z"),
                           numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
                           numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert q.move_dq_after_pads(m) == 1
    onnx.checker.check_model(m)
    assert [n.op_type for n in m.graph.node] == ["Pad", "QuantizeLinear", "DequantizeLinear", "Conv"]
    after = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(before, after)


def test_expanded_function_computes_the_node(fp32_bundle):
    b = load_bundle(fp32_bundle)
    pix = b.graph_model("pixelwise")
    expanded = q.expand_spatial_mlp(pix)
    assert not any(n.op_type == "SpatialMLP" for n in expanded.graph.node)
    f = q.pixelwise_feeds(b, maps_for(CFG, 1, 64, 96, 3))[0]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        ["image_float"], f)[0]
    assert np.array_equal(run(pix), run(expanded))
    folded = q.with_function(pix, q.fold_spatial_mlp(pix, expanded))  # the unquantized body folds back unchanged
    assert np.array_equal(run(pix), run(folded))


def test_instance_edge_models_quantize_with_their_instance_maps(tmp_path):
    cfg = ModelConfig(label_nc=5, instance_edges=True, crop_size=256, aspect_ratio=1.0, lr_width=8, lr_max_width=16,
                      lr_depth=1, hr_width=16, hr_depth=3)
    out = tmp_path / "bundle"
    export_model(random_generator(cfg, 2), out, fp16=False)
    b = load_bundle(out)
    res = q.quantize_bundle(b, maps_for(cfg, 2, 64, 64, 10), maps_for(cfg, 1, 64, 64, 20),
                            q.QuantizeOptions(sensitivity="never"))
    assert res.gate.stages["predictor"]["cosine"] > 0.98
    assert res.gate.stages["end_to_end"]["psnr_db"] > 25
    assert not any("asap.int8.onnx differs" in f for f in res.gate.failures)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("nncf"), reason="nncf is not installed")
def test_nncf_method(fp32_bundle):
    b = load_bundle(fp32_bundle)
    res = q.quantize_bundle(b, maps_for(CFG, 3, 64, 64, 60), maps_for(CFG, 1, 64, 64, 70),
                            q.QuantizeOptions(method="nncf", sensitivity="never"))
    assert res.description["tool"]["name"] == "nncf"
    assert res.gate.stages["predictor"]["cosine"] > 0.98
    pred = onnx.load_model_from_string(res.graphs["predictor"])
    convs = {n["name"] for n in res.description["int8_nodes"] if n["op_type"] == "Conv"}
    assert convs and convs <= {n.name for n in pred.graph.node if n.op_type == "Conv"}


def test_pixelwise_auto_keeps_fp32_when_its_int8_stage_fails(fp32_bundle, monkeypatch):
    b = load_bundle(fp32_bundle)
    monkeypatch.setitem(val.THRESHOLDS, "int8", STRICT)
    res = q.quantize_bundle(b, maps_for(CFG, 2, 64, 64, 80), maps_for(CFG, 1, 64, 64, 90),
                            q.QuantizeOptions(pixelwise="auto", sensitivity="never"))
    assert res.pixelwise.startswith("fp32: its int8 MatMuls failed the gate on their own (psnr_db")
    assert res.graphs["pixelwise"] == b.graph_bytes("pixelwise")  # the fp32 graph, as it is
    assert res.gate.stages["pixelwise"]["psnr_db"] == 100.0  # fp32 vs fp32


# ---- TensorRT-RTX: --int8 builds from symmetric int8 QDQ graphs, refuses the others -------------------
def test_tensorrt_takes_symmetric_int8_only(quantized, fp32_bundle, maps_dir, tmp_path, monkeypatch):
    """`--activations int8` graphs pass the TensorRT check (and the manifest says so); the default
    uint8 asymmetric recipe is refused with the node and the fix."""
    d = copy_bundle(fp32_bundle, tmp_path)
    r = quantize_cli(d, maps_dir, "--activations", "int8", monkeypatch=monkeypatch)
    assert r.exit_code == 0, r.output
    qz = load_bundle(d).manifest["quantization"]
    assert qz["tensorrt"].startswith("buildable") and "int8, per tensor, symmetric" in qz["activations"]
    for g in ("predictor", "asap"):
        assert eb.tensorrt_qdq_problems(onnx.load(str(d / f"{g}.int8.onnx"))) == []
    problems = eb.tensorrt_qdq_problems(onnx.load(str(quantized[0] / "predictor.int8.onnx")))
    assert problems and all("uint8, not int8" in p for p in problems)
    assert load_bundle(quantized[0]).manifest["quantization"]["tensorrt"].startswith("not buildable")


def test_build_engine_int8_with_tensorrt_rtx(quantized, fp32_bundle, maps_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")
    shapes = ["--min", "1x16x16", "--opt", "1x64x64", "--max", "2x128x128", "--flavor", "rtx", "--arch", "sm_86"]
    d = copy_bundle(fp32_bundle, tmp_path)
    assert quantize_cli(d, maps_dir, "--activations", "int8", monkeypatch=monkeypatch).exit_code == 0
    r = runner.invoke(app, ["build-engine", str(d), "--int8", "--stage", "predictor", *shapes])
    assert r.exit_code == 0, r.output
    sc = json.loads((d / "predictor.int8.rtx.engine.json").read_text())
    assert sc["precision"] == "int8" and sc["source_onnx"] == {"file": "predictor.int8.onnx",
                                                                "sha256": sha(d / "predictor.int8.onnx")}
    assert "--int8" in __import__("asap_deploy.engines.build", fromlist=["x"]).rebuild_command(sc)
    r = runner.invoke(app, ["build-engine", str(quantized[0]), "--int8", "--stage", "predictor", *shapes,
                            "-o", str(tmp_path / "eng")])
    assert r.exit_code == 11 and "symmetric int8" in r.output and "--activations int8" in r.output
    r = runner.invoke(app, ["build-engine", str(fp32_bundle), "--int8", "--stage", "predictor", *shapes,
                            "-o", str(tmp_path / "eng2")])
    assert r.exit_code == 11 and "no int8 graphs in this bundle" in r.output
    r = runner.invoke(app, ["build-engine", str(d), "--int8", "--fp16", "--stage", "predictor", *shapes])
    assert r.exit_code == 2 and "--fp16 and --int8" in r.output
    # re-quantizing a bundle that holds engines keeps them (byte-identical), and the stale int8 engine is refused
    before = sha(d / "predictor.int8.rtx.engine")
    assert quantize_cli(d, maps_dir, "--activations", "int8", "--overwrite", "--seed", "3",
                        monkeypatch=monkeypatch).exit_code == 0
    assert sha(d / "predictor.int8.rtx.engine") == before
    from asap_deploy.engines.build import check_sidecar, read_sidecar
    from asap_deploy.errors import EngineError

    with pytest.raises(EngineError, match="re-exported since"):
        check_sidecar(read_sidecar(d / "predictor.int8.rtx.engine"), bundle=load_bundle(d))


def test_build_engine_int8_all_stages_with_the_plugin(fp32_bundle, maps_dir, tmp_path, monkeypatch, kernel_cache):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")
    d = copy_bundle(fp32_bundle, tmp_path)
    assert quantize_cli(d, maps_dir, "--activations", "int8", monkeypatch=monkeypatch).exit_code == 0
    r = runner.invoke(app, ["build-engine", str(d), "--int8", "--stage", "all", "--flavor", "rtx", "--arch", "sm_86",
                            "--min", "1x16x16", "--opt", "1x64x64", "--max", "2x128x128"])
    assert r.exit_code == 0, r.output
    for g in ("predictor", "pixelwise", "asap"):
        sc = json.loads((d / f"{g}.int8.rtx.engine.json").read_text())
        assert sc["precision"] == "int8" and (sc["plugin"] is not None) == (g != "predictor")


def test_calibration_pixels_are_bounded(fp32_bundle, maps_dir, monkeypatch):
    from asap_deploy.app import quantize as app_q

    monkeypatch.setattr(app_q, "MAX_CALIBRATION_PIXELS", 3 * 128 * 128)
    r = runner.invoke(app, ["quantize", str(fp32_bundle), "--calib", str(maps_dir)])
    assert r.exit_code == 5 and "pixels (the limit" in " ".join(r.output.split())


# ---- auto keep-float: the default finds the layers to keep in fp32 when the gate fails --------------------
def _scan(fp32_bundle, keep=("none",)):
    """The gate's end-to-end PSNR and the sensitivity rows of the default graphs (one held-out map:
    the gate's worst-of-maps equals the scan's mean)."""
    b = load_bundle(fp32_bundle)
    names, auto = q.parse_keep_float(keep)
    return q.quantize_bundle(b, maps_for(CFG, 3, 64, 64, 40), maps_for(CFG, 1, 64, 64, 50),
                             q.QuantizeOptions(keep_float=names, auto_keep=auto, sensitivity="always"))


def test_parse_keep_float():
    assert q.parse_keep_float(()) == ((), q.AUTO_KEEP_MAX) == q.parse_keep_float(("auto",))
    assert q.parse_keep_float(("none",)) == ((), 0)
    assert q.parse_keep_float(("a", "b")) == (("a", "b"), 0)
    assert q.parse_keep_float(("a", "auto", "a")) == (("a",), q.AUTO_KEEP_MAX)
    with pytest.raises(q.UsageError, match="takes no other value"):
        q.parse_keep_float(("none", "a"))
    with pytest.raises(q.UsageError, match="reached the quantizer"):
        q.QuantizeOptions(keep_float=("auto",)).check()


def test_auto_keeps_the_layer_that_recovers_most_until_the_gate_passes(fp32_bundle, monkeypatch):
    """A PSNR threshold between the default graphs' PSNR and that with the scan's best layer in fp32:
    the default fails, auto keeps exactly that layer and passes; the result computes what a fresh
    quantization with that layer named in --keep-float computes (the surgery needs no re-calibration)."""
    plain = _scan(fp32_bundle)
    base, best = plain.gate.stages["end_to_end"]["psnr_db"], plain.sensitivity.rows[0]
    assert best.gain_db > 2 * q.AUTO_MIN_GAIN_DB and abs(plain.sensitivity.base_psnr_db - base) < 0.05
    monkeypatch.setitem(val.THRESHOLDS, "int8", dataclasses.replace(LAX, psnr_db=base + best.gain_db / 2))
    none = _scan(fp32_bundle)
    assert not none.gate.passed and none.kept_auto == []  # --keep-float none: auto off
    auto = _scan(fp32_bundle, ("auto",))
    assert auto.gate.passed and [n for n, _ in auto.kept_auto] == [best.keep_float]
    assert best.keep_float in auto.float_convs and best.keep_float not in auto.int8_convs
    assert auto.kept_auto[0][1] == pytest.approx(best.gain_db)
    d = auto.description
    assert d["kept_in_fp32"] == [{"name": best.keep_float,
                                  "reason": f"auto: recovered {best.gain_db:.1f} dB (end-to-end PSNR vs fp32 on 1 map(s))"}]
    assert best.keep_float in {n["name"] for n in d["float_nodes"]}
    assert best.keep_float not in {n["name"] for n in d["int8_nodes"]}
    named = _scan(fp32_bundle, (best.keep_float,))  # explicit: auto off, the same graphs
    assert named.kept_auto == [] and named.description["kept_in_fp32"][0]["reason"] == "--keep-float"
    assert named.description["keep_float_auto"] is False
    labels = random_label_maps(CFG, 1, 96, 64, seed=77)[0]
    outs = []
    for res in (auto, named):
        with q._engine(q.StagedGraphs(load_bundle(fp32_bundle), res.graphs), "int8") as e:
            outs.append(e.generate(labels)[IMAGE_FLOAT])
    assert np.abs(outs[0] - outs[1]).max() <= 1e-4


def test_auto_keeps_nothing_when_the_gate_passes_and_stops_at_its_bound(fp32_bundle, monkeypatch):
    monkeypatch.setitem(val.THRESHOLDS, "int8", LAX)
    res = _scan(fp32_bundle, ("auto",))
    assert res.gate.passed and res.kept_auto == [] and res.description["kept_in_fp32"] == []
    monkeypatch.setitem(val.THRESHOLDS, "int8", STRICT)  # unreachable: auto stops at its bound or a small gain
    res = _scan(fp32_bundle, ("auto",))
    assert not res.gate.passed and 1 <= len(res.kept_auto) <= q.AUTO_KEEP_MAX
    assert all(g >= q.AUTO_MIN_GAIN_DB for _, g in res.kept_auto)
    kept = {n for n, _ in res.kept_auto}
    assert res.sensitivity is not None and not kept & {r.keep_float for r in res.sensitivity.rows}  # scan of the end


def test_cli_default_auto_records_the_kept_layers(fp32_bundle, maps_dir, tmp_path, monkeypatch):
    """asap quantize with no --keep-float: a gate the default graphs fail (STRICT), --force writes them;
    the manifest and the output name what auto kept, and an explicit name turns auto off."""
    d = copy_bundle(fp32_bundle, tmp_path)
    r = quantize_cli(d, maps_dir, "--force", thresholds=STRICT, monkeypatch=monkeypatch)
    assert r.exit_code == 0, r.output
    qz = load_bundle(d).manifest["quantization"]
    kept = qz["kept_in_fp32"]
    assert kept and all(k["reason"].startswith("auto: recovered ") for k in kept)
    assert qz["keep_float_auto"]["max_layers"] == q.AUTO_KEEP_MAX
    assert f"kept in fp32: {kept[0]['name']} (auto: recovered" in " ".join(r.output.split())
    d2 = copy_bundle(fp32_bundle, tmp_path, "named")
    r = quantize_cli(d2, maps_dir, "--force", "--keep-float", kept[0]["name"], thresholds=STRICT,
                     monkeypatch=monkeypatch)
    assert r.exit_code == 0, r.output
    assert load_bundle(d2).manifest["quantization"]["kept_in_fp32"] == [{"name": kept[0]["name"],
                                                                          "reason": "--keep-float"}]
