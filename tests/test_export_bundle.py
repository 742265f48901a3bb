"""Bundle: manifest contents, atomic write, overwrite rules, and refusal of tampered bundles."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from asap_deploy.config import ModelConfig
from asap_deploy.errors import BundleError, OutputError
from asap_deploy.io import MARKER as OWNER_MARKER, read_marker
from asap_deploy.export import bundle as bundle_mod
from asap_deploy.export.bundle import MANIFEST, export_model, load_bundle
from asap_deploy.random_model import random_generator

CFG = ModelConfig(label_nc=6, contain_dontcare_label=True, crop_size=512, lr_width=8, lr_max_width=8, lr_depth=1)


@pytest.fixture(scope="module")
def model():
    return random_generator(CFG, seed=5)


@pytest.fixture(scope="module")
def clean_bundle(model, tmp_path_factory):
    return export_model(model, tmp_path_factory.mktemp("b") / "bundle").path


@pytest.fixture
def bundle(clean_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(clean_bundle, dst)
    return dst


def test_manifest_contents(clean_bundle):
    m = json.loads((clean_bundle / MANIFEST).read_text())
    assert m["schema"] == "asap-deploy/bundle" and m["schema_version"] == 1
    assert ModelConfig.from_dict(m["config"]) == CFG and m["S"] == CFG.S == 32
    assert m["opset"]["ai.onnx"] == 18 and {"onnx", "torch"} <= set(m["versions"])
    assert m["labels"]["dontcare_id"] == 255 and len(m["labels"]["palette"]) == CFG.n_label_channels + 1
    assert m["graphs"]["asap"]["inputs"][0] == {"name": "labels", "dtype": "uint8", "shape": ["N", "H", "W"]}
    assert m["graphs"]["predictor"]["outputs"][0]["shape"] == ["N", CFG.num_params, "H/S", "W/S"]
    names = {p.name for p in clean_bundle.iterdir()} - {MANIFEST, OWNER_MARKER}
    assert names == set(m["files"]) and len(names) == 6
    assert sorted(read_marker(clean_bundle)["files"]) == sorted(names | {MANIFEST})  # ownership: what we wrote
    for name, f in m["files"].items():
        assert hashlib.sha256((clean_bundle / name).read_bytes()).hexdigest() == f["sha256"]
        assert f["precision"] == ("fp16" if ".fp16." in name else "fp32")
    assert "multiple of S=32" in m["dynamic_shapes"]["H"]


def test_edited_byte_is_refused(bundle):
    f = bundle / "pixelwise.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"pixelwise\.onnx: sha256 .* does not match the manifest"):
        load_bundle(bundle)


def test_missing_file_is_refused(bundle):
    (bundle / "asap.fp16.onnx").unlink()
    with pytest.raises(BundleError, match=r"asap\.fp16\.onnx: missing from the bundle"):
        load_bundle(bundle)


@pytest.mark.parametrize("change,message", [
    ({"schema_version": 99}, r"manifest\.json: manifest schema version 99 is not supported"),
    ({"schema": "something/else"}, r"manifest\.json: unknown manifest schema 'something/else'"),
])
def test_unknown_schema_is_refused(bundle, change, message):
    m = json.loads((bundle / MANIFEST).read_text())
    m.update(change)
    (bundle / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_missing_or_broken_manifest(bundle):
    (bundle / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_bundle(bundle)
    (bundle / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(bundle)


def test_failed_export_leaves_nothing(model, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = bundle_mod.graphs.check_graph

    def fail_on_third(m, what):
        calls["n"] += 1
        if calls["n"] == 3:
            raise bundle_mod.graphs.ExportError(f"{what}: injected failure")
        return real(m, what)

    monkeypatch.setattr(bundle_mod.graphs, "check_graph", fail_on_third)
    with pytest.raises(bundle_mod.graphs.ExportError, match="injected"):
        export_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial temp folder


def test_overwrite_rules(model, clean_bundle, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(clean_bundle, target)
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        export_model(model, target, fp16=False)
    export_model(model, target, fp16=False, overwrite=True)
    assert load_bundle(target).precisions == ["fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="holds files asap did not write"):
        export_model(model, other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


def test_fp16_missing_is_a_clear_error(model, tmp_path):
    b = load_bundle(export_model(model, tmp_path / "b32", fp16=False).path)
    with pytest.raises(BundleError, match="no fp16 graphs in this bundle"):
        b.file("asap", "fp16")
