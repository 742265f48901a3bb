"""Every authors' reference checkpoint exports with no config, and ONNX Runtime on the bundle's
graphs reproduces the authors' own output.npy and params.npy from the PNG inputs."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from asap_deploy.export.bundle import export_checkpoint, load_bundle
from asap_deploy.io import read_instance_map, read_label_map, to_uint8
from conftest import AUTHORS_FIXTURE_NAMES, authors_fixture_dir


@pytest.fixture(scope="module", params=AUTHORS_FIXTURE_NAMES)
def fixture_bundle(request, tmp_path_factory):
    d = authors_fixture_dir(request.param)
    meta = json.loads((d / "meta.json").read_text())
    res = export_checkpoint(d / "latest_net_G.pth", tmp_path_factory.mktemp(request.param) / "bundle", fp16=False)
    n = meta["batch"]
    labels = np.stack([read_label_map(d / f"label_{i}.png") for i in range(n)])
    inst = (np.stack([read_instance_map(d / f"instance_{i}.png") for i in range(n)])
            if (d / "instance_0.png").is_file() else None)
    return d, meta, load_bundle(res.path), labels, inst


def _run(bundle, graph, outputs, **arrays):
    sess = ort.InferenceSession(str(bundle.file(graph)), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {i.name: arrays[i.name] for i in sess.get_inputs()})


def test_exports_without_config(fixture_bundle):
    d, meta, bundle, _, _ = fixture_bundle
    assert bundle.manifest["source"]["config_source"] == "inferred"
    assert bundle.config.S == meta["S"] and bundle.config.num_params == meta["params_per_tile"]
    assert bundle.config.mlp_channels == meta["mlp_channels"]


def test_onnxruntime_reproduces_authors_outputs(fixture_bundle):
    d, meta, bundle, labels, inst = fixture_bundle
    want_out = np.load(d / "output.npy").transpose(0, 2, 3, 1)  # (N,3,H,W) -> (N,H,W,3)
    want_params = np.load(d / "params.npy")
    (params,) = _run(bundle, "predictor", ["params"], labels=labels, instances=inst)
    np.testing.assert_allclose(params, want_params, atol=1e-4, rtol=0)
    for graph, feeds in (("asap", dict(labels=labels, instances=inst)),
                         ("pixelwise", dict(labels=labels, params=want_params))):
        img, img_f = _run(bundle, graph, ["image", "image_float"], **feeds)
        assert np.abs(img_f - want_out).max() <= 1e-3, graph
        assert np.abs(img.astype(int) - to_uint8(want_out).astype(int)).max() <= 1, graph
