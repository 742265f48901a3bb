"""A bundle is a closed world (issue 12): the manifest and the graphs may both be edited by whoever
hands you a bundle, and re-signed (hashes in the manifest updated, as a malicious author would).

  files      every byte read comes from a regular file inside the bundle: symlinks leading out,
             FIFOs, devices, folders and files of another size than listed are refused before
             they are read (a link to /dev/zero or a FIFO would otherwise hash or block forever)
  external   graphs keeping tensors in external data files (resolved by onnx against the current
             directory or the model's folder) are refused, wherever the tensor sits
  values     every manifest and palette value is checked for type (True is not 1, 5.0 is not 5),
             range and finiteness (NaN, Infinity, 1e999), and odd JSON (duplicate keys, deep
             nesting, 5000-digit integers) is a one-line error
  rebuild    the torch reference (asap validate, --backend torch) refuses reshaped, retyped,
             truncated or non-finite weights with a BundleError naming the file and the tensor

Each case asserts the exit code, the one-line message naming the file, and that nothing was read
outside the bundle (an audit hook records every open) and nothing was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

from asap_deploy.errors import BundleError, UsageError
from asap_deploy.export.bundle import load_bundle, weights_digest

from .conftest import run_cli, save_png

EXIT = BundleError.exit_code
FILES = ["predictor.onnx", "pixelwise.onnx", "asap.onnx"]
RNG = np.random.default_rng(1212)

_OPENED: list[str] = []


def _audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


class _Opens:
    """Paths opened by Python code (builtins.open, os.open) since the last `reset()` (call it
    once the test has set the bundle up)."""

    def __init__(self):
        self.start = len(_OPENED)

    def reset(self):
        self.start = len(_OPENED)

    def __call__(self) -> list[str]:
        return _OPENED[self.start:]


@pytest.fixture
def opened():
    return _Opens()


@pytest.fixture
def no_hang():
    """A read that blocks (FIFO) or never ends (/dev/zero) fails the test after 20 s instead of hanging."""
    def boom(signum, frame):
        raise TimeoutError("blocked reading a special file")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def _resign(b: Path, name: str, model: onnx.ModelProto, weights: bool = False) -> None:
    """Write `model` as bundle file `name` and update the manifest's hash and size (and, for
    predictor.onnx, the weights hash), as someone handing over an edited bundle would."""
    data = model.SerializeToString()
    (b / name).write_bytes(data)
    m = _manifest(b)
    m["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    if weights:
        keys = _manifest_keys(b)
        inits = {t.name: t for t in model.graph.initializer}
        try:  # a weight that cannot be decoded keeps the old hash: the decoding must refuse it first
            m["source"]["weights_sha256"] = weights_digest({k: numpy_helper.to_array(inits[k]) for k in keys})
        except ValueError:
            pass
    _write_manifest(b, m)


def _manifest_keys(b: Path) -> list[str]:
    from asap_deploy.model import ASAPNetGenerator

    import torch

    with torch.device("meta"):
        return list(ASAPNetGenerator(load_bundle(b, verify=False).config).state_dict())


def _nothing_written(*paths: Path) -> None:
    for p in paths:
        assert not p.exists() or not any(p.iterdir()), p


# ---- files: regular files inside the bundle only ------------------------------------------------
@pytest.mark.parametrize("name", FILES + ["manifest.json"])
def test_symlink_leading_out_refused_even_with_the_right_bytes(bundle_copy, tmp_path, name, opened):
    """An exact copy outside the bundle (the hash matches): still refused, from the link alone."""
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.copyfile(bundle_copy / name, outside)
    (bundle_copy / name).unlink()
    (bundle_copy / name).symlink_to(outside)
    opened.reset()
    with pytest.raises(BundleError, match=r"a symlink leading out of the bundle folder"):
        load_bundle(bundle_copy)
    assert str(outside) not in opened()
    run_cli(["validate", bundle_copy, "--random", "1"], EXIT, names=(name,), says=("symlink leading out",))
    assert not (tmp_path / "bundle-validation").exists()


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "/dev/null", "/proc/self/status", "/"])
@pytest.mark.parametrize("name", ["pixelwise.onnx", "manifest.json"])
def test_symlink_to_special_or_outside_file_refused_before_reading(bundle_copy, name, target, no_hang, opened):
    if not os.path.exists(target):
        pytest.skip(f"{target} absent here")
    (bundle_copy / name).unlink()
    (bundle_copy / name).symlink_to(target)
    opened.reset()
    with pytest.raises(BundleError, match=r"symlink leading out"):
        load_bundle(bundle_copy)
    assert not any(p == target for p in opened())


@pytest.mark.parametrize("name", ["asap.onnx", "manifest.json"])
def test_fifo_in_the_bundle_refused_without_blocking(bundle_copy, name, no_hang, good_map, tmp_path):
    (bundle_copy / name).unlink()
    os.mkfifo(bundle_copy / name)
    with pytest.raises(BundleError, match=r"a FIFO, not a regular file"):
        load_bundle(bundle_copy)
    run_cli(["infer", good_map, "--bundle", bundle_copy, "-o", tmp_path / "o"], EXIT, names=(name,), says=("FIFO",))
    _nothing_written(tmp_path / "o")


@pytest.mark.parametrize("name", ["predictor.onnx", "manifest.json"])
def test_folder_in_place_of_a_file_refused(bundle_copy, name):
    (bundle_copy / name).unlink()
    (bundle_copy / name).mkdir()
    with pytest.raises(BundleError, match=r"a folder, not a regular file"):
        load_bundle(bundle_copy)


def test_symlink_inside_the_bundle_and_a_symlinked_bundle_folder_load(bundle_copy, tmp_path):
    """Links that stay inside the bundle are fine (a folder of links to another of its files)."""
    f = bundle_copy / "asap.onnx"
    f.rename(bundle_copy / "asap.real.onnx")
    f.symlink_to("asap.real.onnx")
    link = tmp_path / "linked_bundle"
    link.symlink_to(bundle_copy)
    assert load_bundle(link).config == load_bundle(bundle_copy).config


@pytest.mark.parametrize("delta", [-1, 1, -1000])
def test_file_of_another_size_than_listed_refused_before_hashing(bundle_copy, delta):
    m = _manifest(bundle_copy)
    m["files"]["predictor.onnx"]["bytes"] += delta
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match=r"predictor\.onnx: \d+ bytes, the manifest says \d+"):
        load_bundle(bundle_copy)


def test_oversized_manifest_refused_unread(bundle_copy):
    m = _manifest(bundle_copy)
    m["padding"] = "x" * (17 << 20)
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match=r"manifest\.json: the bundle file is \d+ bytes, more than the limit"):
        load_bundle(bundle_copy)


# ---- external data: never followed ------------------------------------------------------------------
def _externalise(model: onnx.ModelProto, tensor: onnx.TensorProto, location: str, where: Path) -> None:
    raw = numpy_helper.to_array(tensor).tobytes()
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_bytes(raw)
    tensor.ClearField("float_data")
    tensor.raw_data = raw
    external_data_helper.set_external_data(tensor, location, 0, len(raw))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL


@pytest.mark.parametrize("location", ["weights.bin", "../weights.bin", "sub/weights.bin"])
def test_predictor_with_external_weights_refused_by_validate(bundle_copy, tmp_path, monkeypatch, location, opened):
    """The torch reference read such a file from the current directory; now nothing is opened."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    f = bundle_copy / "predictor.onnx"
    m = onnx.load(str(f))
    t = next(t for t in m.graph.initializer if t.name.endswith("weight") and len(t.dims) == 4)
    _externalise(m, t, location, (bundle_copy / location).resolve())
    copy = (cwd / location).resolve()  # the bytes are there too, wherever onnx would look
    copy.parent.mkdir(parents=True, exist_ok=True)
    if copy != (bundle_copy / location).resolve():
        shutil.copyfile((bundle_copy / location).resolve(), copy)
    _resign(bundle_copy, "predictor.onnx", m)
    opened.reset()
    with pytest.raises(BundleError, match=r"predictor\.onnx: initializer .* keeps its data in an external file"):
        load_bundle(bundle_copy)
    run_cli(["validate", bundle_copy, "--random", "1", "--backend", "torch"], EXIT,
            names=("predictor.onnx",), says=("external file", t.name))
    assert not any("weights.bin" in p for p in opened())
    assert not (tmp_path / "bundle-validation").exists()


def test_external_tensor_inside_the_function_body_refused(bundle_copy, tmp_path, monkeypatch, good_map):
    """A Constant of the SpatialMLP function (pixelwise.onnx) pointing at an absolute path."""
    monkeypatch.chdir(tmp_path)
    f = bundle_copy / "pixelwise.onnx"
    m = onnx.load(str(f))
    nodes = [n for fn in m.functions for n in fn.node if any(a.HasField("t") for a in n.attribute)]
    assert nodes, "the function body has a Constant tensor"
    t = next(a.t for a in nodes[0].attribute if a.HasField("t"))
    secret = tmp_path / "secret.bin"
    _externalise(m, t, str(secret), secret)
    _resign(bundle_copy, "pixelwise.onnx", m)
    run_cli(["infer", good_map, "--bundle", bundle_copy, "--backend", "onnxruntime", "-o", tmp_path / "o"], EXIT,
            names=("pixelwise.onnx",), says=("function", "external file"))
    _nothing_written(tmp_path / "o")


def test_external_data_in_the_end_to_end_graph_refused_for_onnxruntime(bundle_copy, tmp_path, good_map, opened):
    f = bundle_copy / "asap.onnx"
    m = onnx.load(str(f))
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    _externalise(m, t, "w.bin", bundle_copy / "w.bin")  # even a plain name inside the bundle
    _resign(bundle_copy, "asap.onnx", m)
    opened.reset()
    run_cli(["infer", good_map, "--bundle", bundle_copy, "--backend", "onnxruntime", "-o", tmp_path / "o"], EXIT,
            names=("asap.onnx",), says=("external file",))
    assert not any(p.endswith("w.bin") for p in opened())
    _nothing_written(tmp_path / "o")


# ---- values: type, range, finiteness --------------------------------------------------------------
def _edit_text(b: Path, old: str, new: str) -> None:
    text = (b / "manifest.json").read_text()
    assert old in text
    (b / "manifest.json").write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
@pytest.mark.parametrize("where", ["aspect_ratio", "bytes", "versions", "palette"])
def test_non_finite_numbers_anywhere_in_the_manifest_refused(bundle_copy, good_map, tmp_path, token, where):
    m = _manifest(bundle_copy)
    marker = 123456.25
    if where == "aspect_ratio":
        m["config"]["aspect_ratio"] = marker
    elif where == "bytes":
        m["files"]["asap.onnx"]["bytes"] = marker
    elif where == "versions":
        m["versions"]["numpy"] = marker
    else:
        m["labels"]["palette"]["1"][0] = marker
    _write_manifest(bundle_copy, m)
    _edit_text(bundle_copy, "123456.25", token)
    run_cli(["infer", good_map, "--bundle", bundle_copy, "-o", tmp_path / "o"], EXIT, names=("manifest.json",))
    _nothing_written(tmp_path / "o")


@pytest.mark.parametrize("path,value,says", [
    (("schema_version",), True, "schema version"),
    (("schema_version",), 1.0, "schema version"),
    (("config", "lr_width"), 8.0, "config.lr_width"),
    (("config", "label_nc"), 5.0, "config.label_nc"),
    (("config", "crop_size"), -128, "config.crop_size"),
    (("config", "lr_depth"), 257, "config.lr_depth"),  # bounded before anything is built from it
    (("config", "hr_depth"), 300, "config.hr_depth"),
    (("config", "hr_width"), 1 << 17, "config.hr_width"),
    (("config", "instance_edges"), 0, "config.instance_edges"),
    (("config", "reflection_pad"), "false", "config.reflection_pad"),
    (("config", "contain_dontcare_label"), "yes", "config.contain_dontcare_label"),
    (("config", "aspect_ratio"), True, "config.aspect_ratio"),
    (("config", "aspect_ratio"), -1.0, "config.aspect_ratio"),
    (("config", "aspect_ratio"), 5e-324, "config.aspect_ratio"),  # S = crop // (16 * ar) overflows
    (("files", "asap.onnx", "bytes"), True, "size"),
    (("files", "asap.onnx", "bytes"), -5, "size"),
    (("files", "asap.onnx", "bytes"), "1234", "size"),
    (("files", "asap.onnx", "sha256"), "ABC", "64 lowercase hex"),
    (("source",), ["weights_sha256"], "'source' must be a JSON object"),
    (("source", "weights_sha256"), 12, "source.weights_sha256"),
    (("labels",), ["palette"], "'labels' must be a JSON object"),
    (("labels", "palette"), "red", "palette"),
    (("labels", "palette", "1"), [True, 0, 0], "three values 0..255"),
    (("labels", "palette", "1"), [12.7, 0, 0], "three values 0..255"),
    (("labels", "palette", "1"), "255", "three values 0..255"),
    (("labels", "palette", "1"), [1, 2, 3, 4], "three values 0..255"),
    (("labels", "palette", "1"), [256, 0, -1], "three values 0..255"),
    (("graphs",), [], "'graphs' must map"),
    (("precisions",), ["fp32", "fp32"], "precisions"),
    (("S",), True, "'S'"),
])
def test_manifest_values_of_the_wrong_type_or_range_refused(bundle_copy, good_map, tmp_path, path, value, says):
    m = _manifest(bundle_copy)
    node = m
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    assert "manifest.json" in info.value.message and says in info.value.message, info.value.message
    run_cli(["validate", bundle_copy, "--random", "1", "--backend", "torch"], EXIT, names=("manifest.json",))
    assert not (tmp_path / "bundle-validation").exists()


@pytest.mark.parametrize("value", ["missing", None, "e453b41a", ["weights_sha256"]])
def test_validate_checkpoint_with_a_manifest_source_of_the_wrong_kind(bundle_copy, checkpoint, tmp_path, value):
    """`asap validate --checkpoint` compares with source.weights_sha256: no KeyError/AttributeError."""
    m = _manifest(bundle_copy)
    if value == "missing":
        del m["source"]
    else:
        m["source"] = value if not isinstance(value, str) else {"weights_sha256": value}
    _write_manifest(bundle_copy, m)
    run_cli(["validate", bundle_copy, "--random", "1", "--checkpoint", checkpoint], EXIT, names=("manifest.json",),
            says=("source",))
    assert not (tmp_path / "bundle-validation").exists()


@pytest.mark.parametrize("key", ["1_0", " 1", "-1", "1.0", "65536", "x"])
def test_manifest_palette_ids_must_be_plain_numbers(bundle_copy, key):
    m = _manifest(bundle_copy)
    m["labels"]["palette"][key] = [int(v) for v in RNG.integers(0, 256, 3)]
    _write_manifest(bundle_copy, m)
    with pytest.raises(BundleError, match=r"manifest\.json: .*not a palette: the id"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("text_edit", ["duplicate", "deep", "digits", "latin1"])
def test_odd_json_is_a_one_line_error(bundle_copy, tmp_path, good_map, text_edit):
    raw = (bundle_copy / "manifest.json").read_text()
    if text_edit == "duplicate":  # two 'files' objects: which one would be trusted?
        raw = raw.replace('"files":', '"files": {}, "files":', 1)
    elif text_edit == "deep":
        raw = raw[:-1] + ', "deep": ' + "[" * 100000 + "]" * 100000 + "}"
    elif text_edit == "digits":
        raw = raw[:-1] + ', "n": ' + "9" * 5000 + "}"
    (bundle_copy / "manifest.json").write_bytes(b"\xff\xfe" + raw.encode() if text_edit == "latin1" else raw.encode())
    run_cli(["infer", good_map, "--bundle", bundle_copy, "-o", tmp_path / "o"], EXIT, names=("manifest.json",))
    _nothing_written(tmp_path / "o")


# ---- --palette FILE ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ['{"0": [NaN, 0, 0]}', '{"0": [Infinity, 0, 0]}', '{"0": [1e999, 0, 0]}',
                                     '[[-Infinity, 1, 2]]', '{"0": [true, 0, 0]}', '{"0": ["12", 0, 0]}',
                                     '{"0": [1.5, 2, 3]}', '{"0": "123"}', '{"1_0": [1, 2, 3]}',
                                     '{"0": [1, 2, 3], "0": [4, 5, 6]}', "[" * 50000 + "]" * 50000])
def test_palette_file_values_refused_with_exit_2(tmp_path, bundle_dir, content):
    rgb = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    m = save_png(tmp_path / "colour.png", rgb)
    pal = tmp_path / "pal.json"
    pal.write_text(content)
    run_cli(["infer", m, "--bundle", bundle_dir, "--palette", pal, "-o", tmp_path / "o"], UsageError.exit_code,
            names=("pal.json",))
    _nothing_written(tmp_path / "o")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder", "huge"])
def test_palette_file_that_is_not_a_small_regular_file_refused(tmp_path, bundle_dir, good_map, kind, no_hang):
    pal = tmp_path / "pal.json"
    if kind == "fifo":
        os.mkfifo(pal)
    elif kind == "dev_zero":
        pal.symlink_to("/dev/zero")
    elif kind == "folder":
        pal.mkdir()
    else:
        pal.write_text("[" + ",".join(["[1, 2, 3]"] * 1_700_000) + "]")
    run_cli(["infer", good_map, "--bundle", bundle_dir, "--palette", pal, "-o", tmp_path / "o"],
            UsageError.exit_code, names=("pal.json",))
    _nothing_written(tmp_path / "o")


# ---- rebuilding the torch reference ----------------------------------------------------------------
def _edit_weight(b: Path, change) -> str:
    f = b / "predictor.onnx"
    m = onnx.load(str(f))
    t = next(t for t in m.graph.initializer if t.name.endswith("weight") and len(t.dims) == 4)
    change(t)
    _resign(b, "predictor.onnx", m, weights=True)
    return t.name


def _reshape(t):
    a = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(a.reshape(a.shape[0], -1), t.name))


def _retype(t):
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))


def _transpose(t):
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t).swapaxes(0, 1)), t.name))


def _truncate(t):
    t.raw_data = t.raw_data[:-4]


def _nan(t):
    a = numpy_helper.to_array(t).copy()
    a.flat[int(RNG.integers(a.size))] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, t.name))


@pytest.mark.parametrize("change,says", [(_reshape, "in the graph, the model of the manifest's config needs"),
                                         (_retype, "float64"), (_transpose, "needs float32"),
                                         (_truncate, "cannot be decoded"), (_nan, "NaN or Inf")])
def test_validate_refuses_a_re_signed_bad_weight_with_exit_8(bundle_copy, tmp_path, change, says):
    name = _edit_weight(bundle_copy, change)
    load_bundle(bundle_copy)  # consistent hashes: only rebuilding the model can tell
    run_cli(["validate", bundle_copy, "--random", "1"], EXIT, names=("predictor.onnx", name), says=(says,))
    assert not (tmp_path / "bundle-validation").exists()


def test_infer_torch_backend_refuses_a_reshaped_weight(bundle_copy, tmp_path, good_map):
    name = _edit_weight(bundle_copy, _reshape)
    run_cli(["infer", good_map, "--bundle", bundle_copy, "--backend", "torch", "-o", tmp_path / "o"], EXIT,
            names=("predictor.onnx", name))
    _nothing_written(tmp_path / "o")
