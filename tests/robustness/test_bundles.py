"""Untrusted bundles and engine sidecars. tests/test_export_bundle.py covers one edited byte, one
missing file and unknown schema names/versions; tests/test_trt_build.py a tampered engine and
sidecars of another TensorRT/plugin version (with TensorRT-RTX). Here: every file of the bundle,
manifests pointing outside the bundle, hypothesis on manifest bytes, an unexpected custom op, and
the sidecar checks without TensorRT."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import helper

from asap_deploy.engines.build import check_sidecar, read_sidecar
from asap_deploy.errors import AsapError, BundleError, EngineError
from asap_deploy.export.bundle import load_bundle

from .conftest import run_cli

EXIT = BundleError.exit_code
FILES = ["predictor.onnx", "pixelwise.onnx", "asap.onnx"]


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_edited_byte_in_any_file_refused_by_infer(bundle_copy, good_map, tmp_path, name, where):
    f = bundle_copy / name
    data = bytearray(f.read_bytes())
    data[int(where * (len(data) - 1)) if where != -1 else -1] ^= 0x20
    f.write_bytes(bytes(data))
    run_cli(["infer", good_map, "--bundle", bundle_copy, "-o", tmp_path / "o"], EXIT, names=(name,),
            says=("does not match the manifest",))
    assert not (tmp_path / "o" / "good.png").exists()


@pytest.mark.parametrize("name", FILES + ["manifest.json"])
def test_missing_file_refused(bundle_copy, name, tmp_path):
    (bundle_copy / name).unlink()
    run_cli(["validate", bundle_copy, "--random", "1"], EXIT, names=(name,), says=("missing",))


@pytest.mark.parametrize("evil", ["../../../../etc/hostname", "/etc/hostname", "../bundle/asap.onnx", "sub/x.onnx",
                                  "..", "", "/dev/zero", "../../../../dev/zero"])
def test_manifest_paths_outside_the_bundle_refused_before_reading(bundle_copy, evil):
    """('/dev/zero' would make the sha256 check read forever: refused from the name alone.)"""
    m = _manifest(bundle_copy)
    m["files"][evil] = {"sha256": "0" * 64, "bytes": 1}
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match="not a plain file name inside the bundle"):
        load_bundle(bundle_copy)
    run_cli(["build-engine", bundle_copy], EXIT, says=("manifest.json", "refusing to read it"))


@pytest.mark.parametrize("version", [0, 2, 999, "1", None, 1.5])
def test_unknown_schema_versions(bundle_copy, version):
    m = _manifest(bundle_copy)
    m["schema_version"] = version
    _write_manifest(bundle_copy, m)
    run_cli(["validate", bundle_copy], EXIT, names=("manifest.json",), says=("schema version",))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=5))
def test_random_manifest_damage(bundle_dir, tmp_path, edits):
    """Byte flips in manifest.json: a BundleError naming the manifest (or a file), or a bundle that
    still loads; never another exception."""
    import shutil

    b = tmp_path / "m"
    if not b.exists():
        shutil.copytree(bundle_dir, b)
    data = bytearray((bundle_dir / "manifest.json").read_bytes())
    for where, xor in edits:
        data[int(where * len(data))] ^= xor
    (b / "manifest.json").write_bytes(bytes(data))
    try:
        load_bundle(b)
    except BundleError as exc:
        assert str(b) in exc.message


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["files", "precisions", "config", "graphs"]),
       value=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=6))
def test_random_manifest_field_values(bundle_dir, tmp_path, key, value):
    import shutil

    b = tmp_path / "v"
    if not b.exists():
        shutil.copytree(bundle_dir, b)
    m = _manifest(bundle_dir)
    m[key] = value
    _write_manifest(b, m)
    try:
        load_bundle(b)
    except BundleError as exc:
        assert "manifest.json" in exc.message or str(b) in exc.message


@pytest.mark.parametrize("change", [{"hr_width": 32}, {"hr_depth": 4}, {"label_nc": 300}, {"crop_size": 512},
                                    {"contain_dontcare_label": False}])
def test_manifest_config_that_does_not_match_the_graphs_refused(bundle_copy, good_map, tmp_path, change):
    """The manifest is not hashed: a config edited to describe another (valid) model would make
    engines pad, check ids and build kernels for the wrong model. The graphs say which it is."""
    m = _manifest(bundle_copy)
    m["config"].update(change)
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match=r"pixelwise.onnx: the graph does not match the model config"):
        load_bundle(bundle_copy)
    run_cli(["infer", good_map, "--bundle", bundle_copy, "-o", tmp_path / "o"], EXIT,
            names=("pixelwise.onnx",), says=("re-export the bundle",))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_unexpected_custom_op_refused_with_a_typed_error(bundle_copy, good_map, tmp_path):
    """asap.onnx re-signed (manifest hash updated, as a malicious author would) with an extra node
    of an unknown domain: ONNX Runtime refuses it and the user gets a BundleError naming the file."""
    f = bundle_copy / "asap.onnx"
    m = onnx.load(str(f))
    out = m.graph.output[0].name
    m.graph.node.append(helper.make_node("Exfiltrate", [out], ["evil_out"], domain="evil.ops", name="evil"))
    m.opset_import.append(helper.make_opsetid("evil.ops", 1))
    m.graph.output.append(helper.make_tensor_value_info("evil_out", onnx.TensorProto.UINT8, None))
    data = m.SerializeToString()
    f.write_bytes(data)
    man = _manifest(bundle_copy)
    man["files"]["asap.onnx"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    _write_manifest(bundle_copy, man)
    load_bundle(bundle_copy)  # consistent hashes: only the graph itself can tell
    run_cli(["infer", good_map, "--bundle", bundle_copy, "--backend", "onnxruntime", "-o", tmp_path / "o"], EXIT,
            names=("asap.onnx",), says=("ONNX Runtime cannot load this graph", "evil.ops"))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ---- engine sidecars (no TensorRT needed: the checks are plain Python) ------------------------------
def _sidecar(tmp: Path) -> tuple[Path, dict, bytes]:
    blob = b"engine bytes"
    eng = tmp / "asap.fp16.rtx.engine"
    eng.write_bytes(blob)
    sc = {"schema": "asap-deploy/engine", "schema_version": 1, "graph": "asap", "precision": "fp16",
          "engine": {"file": eng.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)},
          "source_onnx": {"file": "asap.fp16.onnx", "sha256": "abc"}, "bundle": {"path": str(tmp)},
          "tensorrt": {"flavor": "rtx", "module": "tensorrt_rtx", "version": "1.7.0"},
          "targets": {"sm": [86, 89]}, "plugin": {"version": "1"}, "profile": {}}
    (tmp / (eng.name + ".json")).write_text(json.dumps(sc))
    return eng, sc, blob


@pytest.mark.parametrize("change,kwargs,message", [
    ({"tensorrt": {"flavor": "rtx", "module": "tensorrt_rtx", "version": "1.6.0"}}, {"trt_version": "1.7.0"},
     "built with tensorrt_rtx 1.6.0, installed is 1.7.0"),
    ({}, {"flavor": "tensorrt"}, "this runner uses tensorrt"),
    ({}, {"sm": 90}, "built for sm_86, sm_89, this GPU is sm_90"),
    ({"plugin": {"version": "0"}}, {}, "plugin is version 0"),
    ({}, {"bundle": type("B", (), {"manifest": {"files": {"asap.fp16.onnx": {"sha256": "def"}}}, "path": "b"})()},
     "re-exported since"),
])
def test_sidecar_of_another_trt_gpu_plugin_or_onnx(tmp_path, change, kwargs, message):
    eng, sc, blob = _sidecar(tmp_path)
    sc.update(change)
    with pytest.raises(EngineError, match=message) as info:
        check_sidecar(sc, blob, **kwargs)
    assert "asap build-engine" in info.value.message and "--overwrite" in info.value.message


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["engine", "tensorrt", "targets", "plugin", "source_onnx", "bundle", "profile"]),
       value=st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2)
       | st.dictionaries(st.sampled_from(["sm", "version", "sha256", "file"]),
                         st.none() | st.integers() | st.text(max_size=4), max_size=2))
def test_random_sidecar_fields(tmp_path, key, value):
    """A sidecar with any field of any type: EngineError or a mismatch EngineError; never another exception."""
    eng, sc, blob = _sidecar(tmp_path)
    sc[key] = value
    (tmp_path / (eng.name + ".json")).write_text(json.dumps(sc))
    try:
        check_sidecar(read_sidecar(eng), blob, flavor="rtx", trt_version="1.7.0", sm=86)
    except EngineError as exc:
        assert eng.name in exc.message
    except AsapError as exc:  # pragma: no cover - any other typed error would be a surprise
        pytest.fail(f"unexpected {type(exc).__name__}: {exc.message}")
