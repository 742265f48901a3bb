"""`asap inspect` on every artifact kind, made here: a checkpoint, a bundle (clean and tampered),
ONNX files (in a bundle, renamed, with external data), engines with their sidecars (hand-written
like build-engine writes them; a real TensorRT-RTX one where it is installed) and kernel folders.
Also: torch's advice to load with weights_only=False never reaches the user (issue 14, bug 2)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from asap_deploy.app.inspect import detect_kind
from asap_deploy.checkpoints import save_generator, torch_message
from asap_deploy.cli import app
from asap_deploy.config import ModelConfig
from asap_deploy.engines.build import SIDECAR_SCHEMA, SIDECAR_VERSION, sidecar_path
from asap_deploy.errors import EngineError
from asap_deploy.export.bundle import export_model
from asap_deploy.plugins.spec import PLUGIN_VERSION
from asap_deploy.random_model import random_generator

CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, crop_size=128, learned_ds_factor=8, lr_width=8,
                  lr_max_width=8, lr_depth=1, hr_width=16)  # S=8, a few thousand weights
runner = CliRunner()


def run(*args, code: int = 0):
    r = runner.invoke(app, ["inspect", *map(str, args)])
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    return r


def run_json(*args) -> dict:
    return json.loads(run(*args, "--json").output)


def flat(text: str) -> str:
    return "".join(text.split())


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A checkpoint and its fp32 bundle (tests that change them copy them first)."""
    d = tmp_path_factory.mktemp("inspect")
    model = random_generator(CFG, 7)
    ck = save_generator(model, d / "model.pt")
    bundle = export_model(model, d / "bundle", fp16=False).path
    return ck, bundle


@pytest.fixture
def bundle_copy(made, tmp_path):
    return Path(shutil.copytree(made[1], tmp_path / "bundle"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_engine(folder: Path, bundle: Path, graph: str = "pixelwise", **change) -> Path:
    """Engine bytes and a sidecar as build-engine writes them (no TensorRT needed to inspect them)."""
    eng = folder / f"{graph}.fp32.rtx.engine"
    eng.write_bytes(b"not deserialized by inspect " * 10)
    src = f"{graph}.onnx"
    sc = {"schema": SIDECAR_SCHEMA, "schema_version": SIDECAR_VERSION,
          "engine": {"file": eng.name, "sha256": _sha(eng), "bytes": eng.stat().st_size},
          "graph": graph, "precision": "fp32", "fp16_method": None, "strongly_typed": True,
          "source_onnx": {"file": src, "sha256": _sha(bundle / src)},
          "bundle": {"path": "/somewhere/else/never/read", "weights_sha256": "0" * 64, "S": 8, "num_params": 1171},
          "tensorrt": {"flavor": "rtx", "module": "tensorrt_rtx", "version": "1.7.1.116"},
          "targets": {"kind": "rtx-compute-capabilities", "sm": [86, 89], "built_on_gpu": False},
          "plugin": {"name": "SpatialMLP", "namespace": "asap", "version": PLUGIN_VERSION, "layers": 1,
                     "kernel_archs": [86, 89], "kernel_dtypes": [["fp32", "fp32"]], "triton_version": "3.9.0",
                     "kernel_pack_sha256": "1" * 64},
          "profile": {"labels_NHW": {"min": [1, 8, 8], "opt": [1, 64, 64], "max": [2, 128, 128]}, "inputs": {}},
          "io": {}, "timing_cache": None}
    sc.update(change)
    sidecar_path(eng).write_text(json.dumps(sc))
    return eng


# ---- which kind ------------------------------------------------------------------------------------
def test_detect_kind_from_the_path(made, tmp_path):
    ck, bundle = made
    eng = fake_engine(tmp_path, bundle)
    shutil.copy(bundle / "predictor.onnx", tmp_path / "graph.bin")  # ONNX by its bytes, not its name
    shutil.copy(ck, tmp_path / "weights.bin")
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "index.json").write_text("{}")
    cases = {bundle: ("bundle", bundle), bundle / "manifest.json": ("bundle", bundle),
             bundle / "asap.onnx": ("onnx", bundle / "asap.onnx"),
             tmp_path / "graph.bin": ("onnx", tmp_path / "graph.bin"),
             eng: ("engine", eng), sidecar_path(eng): ("engine", eng), ck: ("checkpoint", ck),
             tmp_path / "weights.bin": ("checkpoint", tmp_path / "weights.bin"),
             tmp_path / "k": ("kernels", tmp_path / "k"), tmp_path / "k" / "index.json": ("kernels", tmp_path / "k")}
    for path, want in cases.items():
        assert detect_kind(path) == want, path


def test_a_folder_of_something_else_and_special_files(tmp_path, made):
    (tmp_path / "plain").mkdir()
    r = run(tmp_path / "plain", code=2)
    assert "neither a bundle" in r.output
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    r = run(fifo, code=8)  # refused from its stat, never opened (a FIFO would block)
    assert "not a regular file" in r.output
    r = run(made[1], "--preset", "facades", code=2)
    assert "checkpoint" in r.output
    r = run(made[0], "--bundle", made[1], code=2)
    assert "--bundle" in r.output


# ---- checkpoint --------------------------------------------------------------------------------------
def test_checkpoint_as_before(made):
    ck = made[0]
    info = run_json(ck)
    assert info["kind"] == "checkpoint" and info["config"] == CFG.to_dict() and info["config_source"] == "checkpoint"
    assert info["parameters"]["predicted_per_tile"] == CFG.num_params
    r = run(ck)
    assert "config checkpoint" in r.output and "low-res stream parameters" in r.output


# ---- bundle ----------------------------------------------------------------------------------------
def test_bundle_summary_and_every_file_verified(made):
    bundle = made[1]
    info = run_json(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert info["kind"] == "bundle" and info["verified"] is True
    assert info["config"] == CFG.to_dict() and info["S"] == CFG.S and info["precisions"] == ["fp32"]
    assert [f["file"] for f in info["files"]] == sorted(manifest["files"])
    assert {f["status"] for f in info["files"]} == {"ok"}
    assert info["custom_op"]["domain"] == "asap" and info["custom_op"]["op_type"] == "SpatialMLP"
    r = run(bundle)
    assert "VERIFIED" in r.output and "NOT VERIFIED" not in r.output and "pixelwise.onnx" in r.output


def test_tampered_bundle_is_shown_file_by_file(bundle_copy, tmp_path):
    b = bundle_copy
    data = bytearray((b / "pixelwise.onnx").read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes
    (b / "pixelwise.onnx").write_bytes(bytes(data))
    with open(b / "asap.onnx", "ab") as f:
        f.write(b"\0")  # another size
    (b / "predictor.onnx").unlink()
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(b"outside")
    os.symlink(secret, b / "predictor.onnx")  # a symlink leading out: reported, never read
    info = run_json(b)
    status = {f["file"]: f["status"] for f in info["files"]}
    assert status == {"pixelwise.onnx": "mismatch", "asap.onnx": "mismatch", "predictor.onnx": "refused"}
    assert info["verified"] is False
    by = {f["file"]: f for f in info["files"]}
    assert by["pixelwise.onnx"]["found_sha256"] == _sha(b / "pixelwise.onnx")
    assert "symlink leading out" in by["predictor.onnx"]["detail"]
    (b / "predictor.onnx").unlink()
    os.mkfifo(b / "predictor.onnx")  # a FIFO is never opened
    (b / "asap.onnx").unlink()
    info = run_json(b)
    status = {f["file"]: f["status"] for f in info["files"]}
    assert status["asap.onnx"] == "missing" and status["predictor.onnx"] == "refused"
    r = run(b)
    out = flat(r.output)
    assert "mismatch" in out and "missing" in out and "NOTVERIFIED" in out


def test_graph_with_the_right_hash_but_another_config_is_invalid(bundle_copy):
    """The manifest edited (hash entries updated) to describe another model: the pixelwise graph no
    longer matches its config, as load_bundle would refuse."""
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["config"]["hr_width"] = 32
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    info = run_json(bundle_copy)
    by = {f["file"]: f for f in info["files"]}
    assert by["pixelwise.onnx"]["status"] == "invalid" and "does not match" in by["pixelwise.onnx"]["detail"]


def test_unreadable_manifest_is_a_bundle_error(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    r = run(bundle_copy, code=8)
    assert "manifest.json" in r.output


# ---- ONNX -------------------------------------------------------------------------------------------
def test_onnx_file_report(made):
    bundle = made[1]
    f = bundle / "asap.onnx"
    info = run_json(f)
    model = onnx.load(str(f), load_external_data=False)
    assert info["kind"] == "onnx" and info["sha256"] == _sha(f) and info["bytes"] == f.stat().st_size
    assert info["opset"] == {"ai.onnx": 18, "asap": 1} and info["ir_version"] == model.ir_version
    assert [i["name"] for i in info["inputs"]] == ["labels"]
    assert info["inputs"][0]["dtype"] == "uint8" and info["inputs"][0]["shape"] == ["N", "H", "W"]
    assert {o["name"] for o in info["outputs"]} == {o.name for o in model.graph.output}
    assert info["ops"]["asap::SpatialMLP"] == 1 and sum(info["ops"].values()) == info["nodes"] == len(model.graph.node)
    [custom] = info["custom_nodes"]
    assert (custom["domain"], custom["op_type"], custom["function_body"]) == ("asap", "SpatialMLP", True)
    assert custom["attributes"]["plugin_namespace"] == "asap" and custom["attributes"]["tile_size"] == CFG.S
    assert [fn["name"] for fn in info["functions"]] == ["SpatialMLP"]
    want = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert info["initializers"]["bytes"] == want > 0
    assert info["bundle"]["status"] == "ok" and info["external_data"] == []
    r = run(f)
    assert "asap::SpatialMLP" in r.output and "labels" in r.output


def test_onnx_outside_a_bundle_and_edited_inside_one(made, bundle_copy, tmp_path):
    shutil.copy(made[1] / "predictor.onnx", tmp_path / "renamed.model")
    info = run_json(tmp_path / "renamed.model")  # found by its bytes
    assert info["kind"] == "onnx" and "bundle" not in info and info["custom_nodes"] == []
    m = onnx.load(str(bundle_copy / "predictor.onnx"))
    m.producer_name = "edited"
    (bundle_copy / "predictor.onnx").write_bytes(m.SerializeToString())
    assert run_json(bundle_copy / "predictor.onnx")["bundle"]["status"] == "mismatch"


def test_onnx_external_data_is_listed_never_read(tmp_path):
    from onnx import TensorProto, helper

    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../../etc/shadow"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [t])
    f = tmp_path / "ext.onnx"
    f.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    info = run_json(f)
    assert info["external_data"] == [{"tensor": "initializer w", "location": "../../../etc/shadow"}]
    assert info["initializers"]["bytes"] == 16 and info["ops"] == {"Add": 1}


def test_onnx_that_protobuf_refuses(tmp_path):
    f = tmp_path / "junk.onnx"
    f.write_bytes(b"\x08\x09\x12\xff\xff\xff")
    r = run(f, code=8)
    assert "junk.onnx" in r.output and "not a readable ONNX file" in r.output


# ---- the weights_only=False advice never reaches the user (bug 2) -------------------------------------
def test_bug2_onnx_and_bundle_are_inspected_not_loaded_as_checkpoints(made):
    bundle = made[1]
    r = run(bundle / "asap.onnx")
    assert "weights_only" not in r.output and "checkpoint" not in r.output
    r = run(bundle)
    assert "no such checkpoint" not in r.output and "VERIFIED" in r.output


def _torch_style_error() -> pickle.UnpicklingError:
    """The text torch.load wraps around a weights-only refusal (torch/serialization.py)."""
    from torch.serialization import UNSAFE_MESSAGE

    return pickle.UnpicklingError(
        f"Weights only load failed. {UNSAFE_MESSAGE}\nPlease file an issue with the following so that we can make "
        "`weights_only=True` compatible with your use case: WeightsUnpickler error: \n\nUnsupported operand 149\n\n"
        "Check the documentation of torch.load to learn more about types accepted by default with weights_only "
        "https://pytorch.org/docs/stable/generated/torch.load.html.")


def test_torch_message_drops_the_unsafe_advice():
    from torch.serialization import UNSAFE_MESSAGE

    assert torch_message(_torch_style_error()) == "WeightsUnpickler error: Unsupported operand 149"
    globals_text = ("Weights only load failed. This file can still be loaded, to do so you have two options, "
                    "\033[1mdo those steps only if you trust the source of the checkpoint\033[0m. "
                    f"\n\t(1) {UNSAFE_MESSAGE}\n\t(2) Alternatively, to load with `weights_only=True` please check the "
                    "recommended steps in the following error message.\n\tWeightsUnpickler error: Unsupported global: "
                    "GLOBAL os.system was not an allowed global by default. Please use "
                    "`torch.serialization.add_safe_globals([os.system])` or the `torch.serialization.safe_globals"
                    "([os.system])` context manager to allowlist this global if you trust this class/function.")
    text = torch_message(RuntimeError(globals_text))
    assert "GLOBAL os.system was not an allowed global" in text
    for advice in ("weights_only", "False", "safe_globals", "trust", "\033"):
        assert advice not in text, (advice, text)


@pytest.fixture(scope="module")
def label_map(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("maps") / "map.png"
    Image.fromarray((np.arange(256, dtype=np.uint8).reshape(16, 16) % 5)).save(p)
    return p


def _commands(f: Path, tmp_path: Path, label_map: Path) -> list[list[str]]:
    return [["inspect", str(f)], ["export", str(f), "-o", str(tmp_path / "b")],
            ["infer", str(label_map), "--model", str(f), "-o", str(tmp_path / "o")]]


def test_no_command_passes_on_torchs_weights_only_advice(made, tmp_path, label_map, monkeypatch):
    """torch.load refusing a file (after our pre-scan passed it): the error says it was refused,
    and none of torch's advice to re-run torch.load with weights_only=False."""
    import torch

    def refuse(*a, **k):
        raise _torch_style_error()

    monkeypatch.setattr(torch, "load", refuse)
    for args in _commands(made[0], tmp_path, label_map):
        r = runner.invoke(app, args)
        assert r.exit_code == 4, (args, r.output)
        assert "refused to load" in r.output and flat("Unsupported operand 149") in flat(r.output)
        assert "weights_only" not in r.output and "False" not in r.output, r.output


@pytest.mark.parametrize("name", ["predictor.onnx", "manifest.json"])
def test_non_checkpoint_files_given_as_checkpoints(made, tmp_path, label_map, name):
    """A bundle's ONNX or manifest given to export / infer --model: a hint naming the bundle folder
    (tests/test_path_hints.py), never torch's advice."""
    f = made[1] / name
    for args in _commands(f, tmp_path, label_map)[1:]:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "a file of a bundle" in r.output, (args, r.output)
        assert "weights_only" not in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "o").exists()


# ---- engines -----------------------------------------------------------------------------------------
def test_engine_sidecar_report(bundle_copy):
    eng = fake_engine(bundle_copy, bundle_copy)
    info = run_json(eng)
    assert info["kind"] == "engine" and info["sidecar"] == "ok" and info["engine_matches_sidecar"] == "ok"
    assert info["name"] == {"graph": "pixelwise", "precision": "fp32", "flavor": "rtx"}
    assert info["tensorrt"] == {"flavor": "rtx", "module": "tensorrt_rtx", "version": "1.7.1.116"}
    assert info["targets"]["sm"] == [86, 89] and info["precision"] == "fp32"
    assert info["plugin"]["version"] == PLUGIN_VERSION and info["plugin"]["current"] is True
    assert info["profile"]["labels_NHW"]["max"] == [2, 128, 128]
    src = info["source_onnx"]
    assert src["status"] == "ok" and src["file"] == "pixelwise.onnx" and src["bundle"] == str(bundle_copy)
    assert info["built_from"]["bundle_path"] == "/somewhere/else/never/read"
    r = run(eng)
    out = flat(r.output)
    assert "tensorrt_rtx1.7.1.116" in out and "sm_86,sm_89" in out and "min1x8x8" in out


def test_engine_whose_source_or_bytes_changed(bundle_copy):
    eng = fake_engine(bundle_copy, bundle_copy, source_onnx={"file": "pixelwise.onnx", "sha256": "a" * 64},
                      plugin={"name": "SpatialMLP", "version": "0"})
    info = run_json(eng)
    assert info["source_onnx"]["status"] == "mismatch" and "re-exported" in info["source_onnx"]["detail"]
    assert info["plugin"]["current"] is False
    eng.write_bytes(b"other bytes")
    assert run_json(eng)["engine_matches_sidecar"] == "mismatch"
    eng = fake_engine(bundle_copy, bundle_copy, graph="predictor")
    with open(bundle_copy / "predictor.onnx", "ab") as f:
        f.write(b"\0")
    src = run_json(eng)["source_onnx"]
    assert src["status"] == "mismatch" and "changed after export" in src["detail"]
    r = run(eng)
    assert "mismatch" in r.output


def test_engine_elsewhere_needs_bundle_and_never_reads_the_sidecars_paths(made, tmp_path):
    bundle = made[1]
    eng = fake_engine(tmp_path, bundle, source_onnx={"file": "../bundle/pixelwise.onnx", "sha256": "b" * 64})
    assert run_json(eng)["source_onnx"]["status"] == "unknown"
    src = run_json(eng, "--bundle", bundle)["source_onnx"]
    assert src["status"] == "unlisted"  # a name that is not a plain file of the manifest is never read
    eng = fake_engine(tmp_path, bundle)
    assert run_json(eng, "--bundle", bundle)["source_onnx"]["status"] == "ok"


def test_engine_without_or_with_a_bad_sidecar(bundle_copy):
    eng = fake_engine(bundle_copy, bundle_copy)
    sidecar_path(eng).unlink()
    info = run_json(eng)
    assert info["sidecar"] == "missing" and "no sidecar" in info["detail"] and info["sha256"] == _sha(eng)
    sidecar_path(eng).write_text(json.dumps({"schema": "something else"}))
    assert run_json(eng)["sidecar"] == "invalid"
    sidecar_path(eng).unlink()
    os.mkfifo(sidecar_path(eng))  # refused from its stat, never waited on
    info = run_json(eng)
    assert info["sidecar"] == "invalid" and "not a regular file" in info["detail"]
    r = run(eng)
    assert "invalid" in r.output


def test_read_sidecar_refuses_oversized_sidecars(bundle_copy, monkeypatch):
    from asap_deploy.engines import build

    eng = fake_engine(bundle_copy, bundle_copy)
    monkeypatch.setattr(build, "MAX_SIDECAR_BYTES", 64)
    with pytest.raises(EngineError, match="more than the limit"):
        build.read_sidecar(eng)


def test_real_rtx_engine(made, tmp_path):
    """An engine TensorRT-RTX built (predictor: no plugin, under a second on CPU)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")
    bundle = Path(shutil.copytree(made[1], tmp_path / "bundle"))
    r = runner.invoke(app, ["build-engine", str(bundle), "--flavor", "rtx", "--arch", "sm_86", "--stage", "predictor",
                            "--min", "1x8x8", "--opt", "1x64x64", "--max", "1x64x64"])
    assert r.exit_code == 0, r.output
    info = run_json(bundle / "predictor.fp32.rtx.engine")
    assert info["sidecar"] == "ok" and info["engine_matches_sidecar"] == "ok"
    assert info["tensorrt"]["module"] == "tensorrt_rtx" and info["targets"]["sm"] == [86]
    assert info["plugin"] is None and info["source_onnx"]["status"] == "ok"
    assert info["profile"]["labels_NHW"]["opt"] == [1, 64, 64]
    b = run_json(bundle)
    assert b["verified"] and "predictor.fp32.rtx.engine" in b["other_files"]


# ---- kernel folders --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    pytest.importorskip("triton")
    d = tmp_path_factory.mktemp("kern")
    cfg = d / "cfg.json"
    cfg.write_text(json.dumps({"label_nc": 5, "crop_size": 256}))
    r = runner.invoke(app, ["compile-kernels", "--arch", "sm_86", "--config", str(cfg), "--out-dtype", "fp32",
                            "--params-dtype", "fp16", "-o", str(d / "k")])
    assert r.exit_code == 0, r.output
    return d / "k"


def test_kernel_folder_report(kernels):
    info = run_json(kernels)
    index = json.loads((kernels / "index.json").read_text())
    assert info["kind"] == "kernels" and info["verified"] is True and info["owner"] == "kernels"
    assert [k["json"] for k in info["kernels"]] == [e["json"] for e in index["kernels"]]
    mlp = info["kernels"][0]
    assert mlp["kind"] == "spatial_mlp" and mlp["arch"] == "sm_86" and mlp["kernel_name"] == "asap_spatial_mlp"
    assert mlp["params_dtype"] == "fp16" and mlp["out_dtype"] == "fp32" and mlp["S"] == 16
    assert mlp["cubin_bytes"] == (kernels / index["kernels"][0]["json"].replace(".json", ".cubin")).stat().st_size
    r = run(kernels)
    assert "asap_spatial_mlp" in r.output and "VERIFIED" in r.output


def test_damaged_kernel_folder(kernels, tmp_path):
    k = Path(shutil.copytree(kernels, tmp_path / "k"))
    index = json.loads((k / "index.json").read_text())
    cubin = k / index["kernels"][0]["json"].replace(".json", ".cubin")
    data = bytearray(cubin.read_bytes())
    data[100] ^= 0xFF
    cubin.write_bytes(bytes(data))
    info = run_json(k)
    assert info["verified"] is False
    assert info["kernels"][0]["status"] == "damaged" and "sha256" in info["kernels"][0]["detail"]
    assert {x["status"] for x in info["kernels"][1:]} == {"ok"}
    (k / "index.json").unlink()  # an unfinished compile-kernels run: still a kernel folder (its marker)
    info = run_json(k)
    assert info["index"] == "missing" and info["kernels"] == []
