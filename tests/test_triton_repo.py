"""`asap export --triton-repo`: configs parse as Triton's ModelConfig, the ONNX model runs in ONNX
Runtime with the config's declared I/O, the Python-backend TensorRT model's code runs against a
stand-in of Triton's Python backend utilities, atomic and refusing writes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="config checks need tritonclient (in the [test] extra)")
pytest.importorskip("torch", reason="making the test bundle needs torch (asap-deploy[torch])")

from typer.testing import CliRunner  # noqa: E402

from asap_deploy.cli import app  # noqa: E402
from asap_deploy.config import ModelConfig  # noqa: E402
from asap_deploy.errors import BundleError, OutputError, UsageError  # noqa: E402
from asap_deploy.export.bundle import export_model, load_bundle  # noqa: E402
from asap_deploy.random_model import random_generator  # noqa: E402
from asap_deploy.app.triton_repo import (MARKER, PYTHON_MODEL, RepoOptions, check_onnx_matches_config,  # noqa: E402
                                            config_text, parse_config, write_triton_repo)

CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, crop_size=128, learned_ds_factor=8, lr_width=8,
                  lr_max_width=8, lr_depth=1, hr_width=16)
CFG_INST = CFG.replace(instance_edges=True, contain_dontcare_label=False)
runner = CliRunner()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    return {name: export_model(random_generator(cfg, 2), d / name, fp16=False).path
            for name, cfg in (("plain", CFG), ("inst", CFG_INST))}


def test_config_parses_with_tritons_schema():
    from tritonclient.grpc import model_config_pb2 as mc

    msg = parse_config(config_text("asap", "onnxruntime", CFG_INST, RepoOptions(max_batch=6, max_delay_ms=1.5,
                                                                                  instances=2), "cpu"))
    assert (msg.name, msg.backend, msg.max_batch_size) == ("asap", "onnxruntime", 6)
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in msg.input] == [
        ("labels", "TYPE_UINT8", [-1, -1]), ("instances", "TYPE_INT32", [-1, -1])]
    assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in msg.output] == [
        ("image", "TYPE_UINT8", [-1, -1, 3])]
    assert msg.dynamic_batching.max_queue_delay_microseconds == 1500
    assert [(g.count, mc.ModelInstanceGroup.Kind.Name(g.kind)) for g in msg.instance_group] == [(2, "KIND_CPU")]
    assert msg.parameters["S"].string_value == "8" and msg.parameters["label_nc"].string_value == "5"
    assert parse_config(config_text("asap", "onnxruntime", CFG.replace(label_nc=300), RepoOptions(), "gpu")
                        ).input[0].data_type == mc.TYPE_INT32


@pytest.mark.parametrize("text, msg", [("name: \"a\"\nmax_batch_size: eight\n", "not a valid Triton model config"),
                                       ("name: \"a\"\nbogus_field: 1\n", "bogus_field")])
def test_bad_config_text_refused(text, msg):
    with pytest.raises(BundleError, match=msg):
        parse_config(text, "x/config.pbtxt")


@pytest.mark.parametrize("kw, msg", [({"max_batch": 0}, "--max-batch"), ({"instances": 0}, "--instances"),
                                     ({"kind": "tpu"}, "cpu or gpu"), ({"max_delay_ms": -2}, "--max-delay-ms")])
def test_options_refused(kw, msg):
    with pytest.raises(UsageError, match=msg):
        RepoOptions(**kw).check()


@pytest.mark.parametrize("which", ["plain", "inst"])
def test_repository_onnx_runs_with_declared_io(bundles, tmp_path, which):
    import onnxruntime as ort

    bundle = load_bundle(bundles[which])
    res = write_triton_repo(bundle, tmp_path / "repo")
    assert list(res.models) == ["asap"] and "only the ONNX Runtime model" in res.notes[0]
    cfg_msg = parse_config((tmp_path / "repo/asap/config.pbtxt").read_text())
    model = tmp_path / "repo/asap/1/model.onnx"
    check_onnx_matches_config(model, cfg_msg)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for t in cfg_msg.input:  # shapes: the batch axis (max_batch_size > 0) + the declared dims
        dtype = np.uint8 if t.data_type == 2 else np.int32  # TYPE_UINT8 = 2
        feeds[t.name] = rng.integers(0, 5, (2, 16, 24)).astype(dtype)
    out = sess.run([o.name for o in cfg_msg.output], feeds)[0]
    assert out.dtype == np.uint8 and out.shape == (2, 16, 24, 3)
    from asap_deploy.engines import create_engine

    assert np.array_equal(out, create_engine("onnxruntime", bundle).run(feeds["labels"], feeds.get("instances")))
    marker = json.loads((tmp_path / "repo" / MARKER).read_text())
    assert marker["models"]["asap"]["sha256"] == bundle.manifest["files"]["asap.onnx"]["sha256"]


def test_mismatched_config_is_caught(bundles, tmp_path):
    write_triton_repo(load_bundle(bundles["plain"]), tmp_path / "r")
    text = (tmp_path / "r/asap/config.pbtxt").read_text().replace("TYPE_UINT8", "TYPE_INT32", 1)
    with pytest.raises(BundleError, match="'labels' is TYPE_UINT8 in the graph, TYPE_INT32 in the config"):
        check_onnx_matches_config(tmp_path / "r/asap/1/model.onnx", parse_config(text))


def test_refuses_and_overwrites(bundles, tmp_path):
    b = load_bundle(bundles["plain"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="holds files asap did not write"):
        write_triton_repo(b, tmp_path / "other", RepoOptions(overwrite=True))
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"
    write_triton_repo(b, tmp_path / "r")
    with pytest.raises(OutputError, match="already exists"):
        write_triton_repo(b, tmp_path / "r")
    write_triton_repo(b, tmp_path / "r", RepoOptions(overwrite=True, max_batch=2))
    assert "max_batch_size: 2" in (tmp_path / "r/asap/config.pbtxt").read_text()
    with pytest.raises(BundleError, match="no end-to-end fp32 TensorRT engine"):
        write_triton_repo(b, tmp_path / "r2", RepoOptions(tensorrt=True))
    assert not (tmp_path / "r2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "r"]  # no partial folders left


def test_tensorrt_python_model(bundles, tmp_path, monkeypatch):
    """The generated model.py, run against a stand-in of triton_python_backend_utils, with the
    TensorRT engine replaced by ONNX Runtime (no GPU here): batching, per-request errors."""
    import shutil

    from asap_deploy import engines

    b = tmp_path / "b"
    shutil.copytree(bundles["plain"], b)
    (b / "asap.fp32.tensorrt.engine").write_bytes(b"stand-in")
    res = write_triton_repo(load_bundle(b), tmp_path / "repo")
    assert list(res.models) == ["asap", "asap_tensorrt"] and not res.notes
    msg = parse_config((tmp_path / "repo/asap_tensorrt/config.pbtxt").read_text())
    assert msg.backend == "python" and msg.instance_group[0].kind == 1  # KIND_GPU
    vdir = tmp_path / "repo/asap_tensorrt/1"
    assert (vdir / "model.py").read_text() == PYTHON_MODEL
    assert json.loads((vdir / "asap_model.json").read_text())["flavor"] == "tensorrt"
    load_bundle(vdir / "bundle")  # the copied bundle verifies

    class Err:
        def __init__(self, message):
            self.message = message

    class Resp:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    pb = types.SimpleNamespace(TritonError=Err, InferenceResponse=Resp, Tensor=Tensor,
                               get_input_tensor_by_name=lambda req, name: req.get(name))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    opened = []

    def fake_create(name, bundle, precision, **kw):
        opened.append((name, precision, kw))
        return real_create("onnxruntime", bundle, precision)

    real_create = engines.create_engine
    monkeypatch.setattr(engines, "create_engine", fake_create)
    import importlib.util

    spec = importlib.util.spec_from_file_location("asap_trt_model", vdir / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    m = mod.TritonPythonModel()
    m.initialize({"model_instance_device_id": "0"})
    assert opened == [("tensorrt", "fp32", {"flavor": "tensorrt", "graphs": ("asap",), "device": 0})]
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 5, (1, 16, 24)).astype(np.uint8) for _ in range(2)]
    reqs = [{"labels": Tensor("labels", good[0])}, {"labels": Tensor("labels", np.full((1, 16, 24), 9, np.uint8))},
            {"labels": Tensor("labels", good[1])}]
    out = m.execute(reqs)
    assert out[1].error is not None and "label id 9" in out[1].error.message
    ref = real_create("onnxruntime", load_bundle(b), "fp32")
    for i, j in ((0, 0), (2, 1)):
        assert out[i].error is None and np.array_equal(out[i].output_tensors[0].array, ref.run(good[j]))
    m.finalize()


def test_cli_export_triton_repo_from_bundle(bundles, tmp_path):
    r = runner.invoke(app, ["export", str(bundles["plain"]), "--triton-repo", str(tmp_path / "repo"),
                            "--triton-max-batch", "3", "--triton-instances", "2"])
    assert r.exit_code == 0, r.output
    assert "tritonserver --model-repository" in " ".join(r.output.split())
    msg = parse_config((tmp_path / "repo/asap/config.pbtxt").read_text())
    assert msg.max_batch_size == 3 and msg.instance_group[0].count == 2
    r = runner.invoke(app, ["export", str(bundles["plain"]), "--triton-repo", str(tmp_path / "repo2"), "-o", "x"])
    assert r.exit_code == 2 and "already a bundle" in r.output
    r = runner.invoke(app, ["export", str(bundles["plain"]), "--triton-repo", str(tmp_path / "repo3"),
                            "--triton-kind", "tpu"])
    assert r.exit_code == 2 and "cpu or gpu" in r.output
