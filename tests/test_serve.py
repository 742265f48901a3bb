"""`asap serve`: the libpython fix, the numpy<2 guard, options, request validation and the
batched infer callable without a server; then a real server on loopback (PyTriton, in this venv
if it has numpy<2, else in the one ASAP_SERVE_PYTHON names, as .ci/run does)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from asap_deploy.app import serve
from asap_deploy.config import ModelConfig
from asap_deploy.errors import InputError, MissingDependencyError, UsageError
from asap_deploy.app.serve import ServeOptions, make_infer_fn, validate_request

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, crop_size=128, learned_ds_factor=8, lr_width=8,
                  lr_max_width=8, lr_depth=1, hr_width=16)  # S=8, ids 0..5 + 255
CFG_INST = CFG.replace(instance_edges=True, contain_dontcare_label=False)


# ---- environment ------------------------------------------------------------------------------------
def test_libpython_dir_goes_first_once():
    libdir = sysconfig.get_config_var("LIBDIR")
    env = serve.libpython_env({"LD_LIBRARY_PATH": f"/opt/x:{libdir}:/opt/y"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/opt/x", "/opt/y"]
    assert serve.libpython_env({})["LD_LIBRARY_PATH"] == libdir
    assert serve.libpython_env({"LD_LIBRARY_PATH": ""})["LD_LIBRARY_PATH"] == libdir
    assert Path(libdir, sysconfig.get_config_var("LDLIBRARY") or "").exists() or not sysconfig.get_config_var("Py_ENABLE_SHARED")


def test_apply_libpython_fix_sets_this_process_env(monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/somewhere")
    value = serve.apply_libpython_fix()
    assert os.environ["LD_LIBRARY_PATH"] == value
    assert value.split(os.pathsep)[:2] == [sysconfig.get_config_var("LIBDIR"), "/somewhere"]


def test_static_interpreter_leaves_env_alone(monkeypatch):
    monkeypatch.setattr(serve, "libpython_dir", lambda: None)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/a")
    assert serve.libpython_env()["LD_LIBRARY_PATH"] == "/a"
    assert serve.apply_libpython_fix() == "/a"


def test_dependency_guard(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "pytriton" else real(n, *a))
    with pytest.raises(MissingDependencyError, match=r"numpy 2\.1\.0.*numpy<2"):
        serve.check_serve_dependencies("2.1.0")
    serve.check_serve_dependencies("1.26.4")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pytriton" else real(n, *a))
    with pytest.raises(MissingDependencyError, match=r"asap-deploy\[serve\]"):
        serve.check_serve_dependencies("1.26.4")


@pytest.mark.parametrize("kw, msg", [
    ({"port": 0}, "--port 0 is not a TCP port"), ({"grpc_port": 8000}, "must differ"),
    ({"max_batch": 0}, "--max-batch must be >= 1"), ({"max_delay_ms": -1}, "--max-delay-ms"),
    ({"host": ""}, "--host"),
])
def test_options_refused(kw, msg):
    with pytest.raises(UsageError, match=msg):
        ServeOptions(**kw).check()


def test_defaults_bind_loopback():
    o = ServeOptions()
    o.check()
    assert o.host == "127.0.0.1"
    assert serve.endpoints(o).to_dict()["health"] == "http://127.0.0.1:8000/v2/health/ready"


def test_model_io_follows_config():
    assert [(n, d.name, s) for n, d, s in serve.model_inputs(CFG)] == [("labels", "uint8", (-1, -1))]
    assert [n for n, _, _ in serve.model_inputs(CFG_INST)] == ["labels", "instances"]
    assert serve.model_inputs(CFG.replace(label_nc=300))[0][1] == np.int32
    assert serve.model_outputs(CFG) == [("image", np.dtype(np.uint8), (-1, -1, 3))]


# ---- request validation -------------------------------------------------------------------------------
def ids(h=16, w=24, n=1, dtype=np.uint8, value=1):
    return np.full((n, h, w), value, dtype)


@pytest.mark.parametrize("req, msg", [
    ({"labels": ids(dtype=np.int32)}, "'labels' must be uint8 label ids, got int32"),
    ({"labels": ids()[0]}, r"must be \(H, W\) label ids per request, got shape \(24,\)"),
    ({"labels": ids(h=12)}, r"24x12 \(WxH\).*multiples of S=8; pad it to 24x16"),
    ({"labels": ids(value=6)}, r"label id 6 at \(x=0, y=0\) is out of range: this model takes ids 0..5 or 255"),
    ({"labels": ids(h=8192, w=8192)}, "outside the served range: 1..16777216 pixels"),
    ({"labels": ids(h=0)}, r"an empty 24x0 \(WxH\) label map"),
    ({"labels": ids(w=0)}, r"an empty 0x16 \(WxH\) label map"),
    ({"labels": ids(n=0)}, "an empty request: its batch dimension is 0"),
    ({}, "has no 'labels' input"),
])
def test_bad_requests_named(req, msg):
    with pytest.raises(InputError, match=msg):
        validate_request(req, CFG)


def test_good_request_and_dontcare():
    a = ids()
    a[0, 3, 5] = 255
    lab, inst = validate_request({"labels": a}, CFG)
    assert lab is a or np.array_equal(lab, a)
    assert inst is None
    with pytest.raises(InputError, match=r"label id 255 at \(x=5, y=3\)"):
        validate_request({"labels": a}, CFG_INST)


def test_instance_inputs_checked():
    a = ids(value=2)
    with pytest.raises(InputError, match="needs an 'instances' input"):
        validate_request({"labels": a}, CFG_INST)
    with pytest.raises(InputError, match="'instances' must be int32"):
        validate_request({"labels": a, "instances": a}, CFG_INST)
    with pytest.raises(InputError, match="must match"):
        validate_request({"labels": a, "instances": np.zeros((1, 8, 8), np.int32)}, CFG_INST)
    _, inst = validate_request({"labels": a, "instances": np.zeros_like(a, np.int32)}, CFG_INST)
    assert inst.dtype == np.int32


# ---- the callable PyTriton runs (with a real ONNX Runtime engine) -------------------------------------------
@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    pytest.importorskip("torch", reason="making the test bundle needs torch (asap-deploy[torch])")
    from asap_deploy.export.bundle import export_model
    from asap_deploy.random_model import random_generator

    return export_model(random_generator(CFG, 3), tmp_path_factory.mktemp("serve") / "b", fp16=False).path


@pytest.fixture(scope="module")
def engine(bundle_dir):
    from asap_deploy.engines import create_engine
    from asap_deploy.export.bundle import load_bundle

    return create_engine("onnxruntime", load_bundle(bundle_dir))


def test_infer_fn_batches_same_sizes_and_keeps_order(engine):
    rng = np.random.default_rng(0)
    reqs = [{"labels": rng.integers(0, 6, (1, h, w)).astype(np.uint8)} for h, w in [(16, 24), (32, 8), (16, 24)]]
    calls = []
    real_run = engine.run

    def counting_run(labels, instances=None):
        calls.append(labels.shape)
        return real_run(labels, instances)

    engine.run = counting_run
    try:
        out = make_infer_fn(engine)(reqs)
    finally:
        del engine.run
    assert sorted(calls) == [(1, 32, 8), (2, 16, 24)]  # the two 16x24 requests ran as one batch
    for r, o in zip(reqs, out):
        assert np.array_equal(o["image"], engine.run(r["labels"]))


def test_infer_fn_names_the_bad_request(engine):
    good, bad = {"labels": ids()}, {"labels": ids(value=9)}
    with pytest.raises(InputError, match=r"request 2 of 3 in this batch: label id 9 .*got no answer: send them again"):
        make_infer_fn(engine)([good, bad, good])
    with pytest.raises(InputError, match=r"^label id 9"):
        make_infer_fn(engine)([bad])
    assert make_infer_fn(engine)([good])[0]["image"].shape == (1, 16, 24, 3)  # still serving


# ---- one answer per request inside a batch (a fake engine: no torch, no server) --------------------------
class FakeEngine:
    """Images that depend on each label map alone (so a batch's answer can be checked against one
    request run alone); counts its calls; fails on request when a map holds id `fail_on`."""

    def __init__(self, cfg=CFG, fail_on: int | None = None):
        self.config, self.calls, self.fail_on = cfg, [], fail_on

    def run(self, labels, instances=None):
        self.calls.append(labels.shape)
        if self.fail_on is not None and (labels == self.fail_on).any():
            raise RuntimeError("/opt/secret/engine.so: kernel exploded\nsecond line")
        x = labels.astype(np.int64)
        if instances is not None:
            x = x + instances
        img = np.stack([x * 40, x * 7 + 1, x.cumsum(axis=2) % 251], axis=-1)
        return (img % 256).astype(np.uint8)


BAD_KINDS = [
    ("wrong dtype", {"labels": ids(dtype=np.int32)}, "must be uint8 label ids, got int32"),
    ("wrong rank", {"labels": ids()[0]}, "must be (H, W) label ids per request"),
    ("zero height", {"labels": ids(h=0)}, "an empty 24x0 (WxH) label map"),
    ("zero width", {"labels": ids(w=0)}, "an empty 0x16 (WxH) label map"),
    ("zero batch", {"labels": ids(n=0)}, "an empty request"),
    ("id out of range", {"labels": ids(value=7)}, "label id 7 at (x=0, y=0) is out of range"),
    ("size not a multiple of S", {"labels": ids(h=12)}, "W and H must be multiples of S=8"),
    ("too many pixels", {"labels": ids(h=64, w=72)}, "outside the served range: 1..4096 pixels"),
    ("no labels", {}, "has no 'labels' input"),
]


@pytest.mark.parametrize("name, req, msg", BAD_KINDS, ids=[k[0] for k in BAD_KINDS])
def test_answer_requests_bad_one_gets_its_own_error(name, req, msg):
    eng = FakeEngine()
    rng = np.random.default_rng(3)
    goods = [rng.integers(0, 6, (1, 16, 24)).astype(np.uint8) for _ in range(3)]
    batch = [{"labels": goods[0]}, req, {"labels": goods[1]}, {"labels": goods[2]}]
    answers = serve.answer_requests(batch, CFG, eng.run, max_pixels=64 * 64)
    assert isinstance(answers[1], InputError) and msg in answers[1].message, answers[1]
    assert "\n" not in answers[1].message
    for a, g in zip([answers[0], answers[2], answers[3]], goods):
        assert isinstance(a, np.ndarray) and np.array_equal(a, FakeEngine().run(g))
    assert eng.calls == [(3, 16, 24)]  # the good ones still ran as one batch


def test_answer_requests_mixed_batch_same_size():
    """A batch of same-size requests, bad ones among them: each good one gets what it gets alone
    (also when it holds 2 maps), each bad one its own error naming its own problem."""
    rng = np.random.default_rng(4)
    batch, expect = [], []
    for i in range(12):
        a = rng.integers(0, 6, (2 if i == 5 else 1, 16, 24)).astype(np.uint8)
        if i in (1, 6, 10):
            a[0, i, 2 * i % 24] = 200 + i
            expect.append(f"label id {200 + i} at (x={2 * i % 24}, y={i})")
        else:
            expect.append(None)
        batch.append({"labels": a})
    eng = FakeEngine()
    answers = serve.answer_requests(batch, CFG, eng.run)
    assert eng.calls == [(10, 16, 24)]
    for req, want, got in zip(batch, expect, answers):
        if want is None:
            assert isinstance(got, np.ndarray) and np.array_equal(got, FakeEngine().run(req["labels"]))
        else:
            assert isinstance(got, InputError) and got.message.startswith(want), got


def test_answer_requests_groups_sizes_and_instances():
    rng = np.random.default_rng(5)
    sizes = [(16, 24), (8, 8), (16, 24), (8, 8), (32, 16)]
    batch = [{"labels": rng.integers(0, 5, (1, h, w)).astype(np.uint8),
              "instances": rng.integers(0, 9, (1, h, w)).astype(np.int32)} for h, w in sizes]
    batch[3]["instances"] = batch[3]["instances"][:, :4]  # shapes differ: its own error
    eng = FakeEngine(CFG_INST)
    answers = serve.answer_requests(batch, CFG_INST, eng.run)
    assert sorted(eng.calls) == [(1, 8, 8), (1, 32, 16), (2, 16, 24)]
    assert isinstance(answers[3], InputError) and "must match" in answers[3].message
    for i in (0, 1, 2, 4):
        assert np.array_equal(answers[i], FakeEngine(CFG_INST).run(batch[i]["labels"], batch[i]["instances"]))


def test_answer_requests_engine_failure_fails_only_its_group():
    rng = np.random.default_rng(6)
    ok = [rng.integers(0, 5, (1, 16, 24)).astype(np.uint8) for _ in range(2)]
    boom = np.full((1, 8, 8), 5, np.uint8)  # valid, but this fake engine fails on id 5
    answers = serve.answer_requests([{"labels": ok[0]}, {"labels": boom}, {"labels": ok[1]}], CFG,
                                    FakeEngine(fail_on=5).run)
    assert isinstance(answers[1], serve.RequestFailed) and not isinstance(answers[1], InputError)
    assert answers[1].message == "the model failed on this request (RuntimeError); the server log has the details"
    assert all(np.array_equal(answers[i], FakeEngine().run(ok[j])) for i, j in ((0, 0), (2, 1)))
    wrong = serve.answer_requests([{"labels": ok[0]}], CFG, lambda lab, inst: np.zeros((1, 8, 8, 3), np.uint8))
    assert isinstance(wrong[0], serve.RequestFailed) and "shape (1, 8, 8, 3)" in wrong[0].message


# ---- the front model `asap`, against a stand-in of triton_python_backend_utils ---------------------------
class _PbError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, msg, code=INTERNAL):
        self.msg, self.code = msg, code

    def message(self):
        return self.msg


class _PbTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class _PbResponse:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.err = list(output_tensors), error

    def has_error(self):
        return self.err is not None

    def error(self):
        return self.err


def _stand_in_pb(engine, bls_calls):
    import types

    class _Request:
        def __init__(self, model_name, inputs, requested_output_names):
            self.model_name, self.inputs = model_name, {t.name: t.array for t in inputs}

        def exec(self):
            bls_calls.append((self.model_name, self.inputs["labels"].shape))
            try:
                return _PbResponse([_PbTensor("image", engine.run(self.inputs["labels"], self.inputs.get("instances")))])
            except Exception as exc:  # noqa: BLE001 - what Triton turns a PyTriton failure into
                return _PbResponse(error=_PbError(f"Traceback (most recent call last):\n  File \"/x/model.py\"\n{exc}"))

    logged = []
    pb = types.SimpleNamespace(
        TritonError=_PbError, Tensor=_PbTensor, InferenceResponse=_PbResponse, InferenceRequest=_Request,
        get_input_tensor_by_name=lambda req, name: _PbTensor(name, req[name]) if name in req else None,
        get_output_tensor_by_name=lambda resp, name: next(t for t in resp.output_tensors if t.name == name),
        Logger=types.SimpleNamespace(log_error=logged.append))
    return pb, logged


def test_front_model_answers_each_request(tmp_path, monkeypatch):
    serve.write_front_model(tmp_path, CFG, ServeOptions(max_batch=8, max_pixels=64 * 64))
    text = (tmp_path / "asap" / "config.pbtxt").read_text()
    assert 'backend: "python"' in text and "max_batch_size: 8" in text and "TYPE_UINT8" in text
    assert 'key: "label_nc"' in text  # asap loadtest reads it
    if importlib.util.find_spec("tritonclient") is not None:  # Triton's own schema
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2

        msg = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert msg.dynamic_batching is not None and [i.name for i in msg.input] == ["labels"]
    spec = importlib.util.spec_from_file_location("asap_front_model", tmp_path / "asap" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # as Triton's Python backend loads it
    bls: list = []
    eng = FakeEngine(fail_on=5)
    pb, logged = _stand_in_pb(eng, bls)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    model = module.TritonPythonModel()
    model.initialize({"model_name": "asap", "model_version": "1"})
    rng = np.random.default_rng(8)
    good = [{"labels": rng.integers(0, 5, (1, 16, 24)).astype(np.uint8)} for _ in range(3)]
    bad = {"labels": ids(value=9)}
    boom = {"labels": np.full((1, 8, 8), 5, np.uint8)}
    out = model.execute([good[0], bad, good[1], boom, good[2], {"labels": ids(h=72, w=64)}])
    assert bls == [("asap_engine", (3, 16, 24)), ("asap_engine", (1, 8, 8))]
    for i, j in ((0, 0), (2, 1), (4, 2)):
        assert not out[i].has_error()
        assert np.array_equal(out[i].output_tensors[0].array, FakeEngine().run(good[j]["labels"]))
    assert out[1].err.code == "INVALID_ARG" and out[1].err.msg.startswith("label id 9 at (x=0, y=0)")
    assert out[5].err.code == "INVALID_ARG" and "outside the served range: 1..4096 pixels" in out[5].err.msg
    assert out[3].err.code == "INTERNAL"
    assert out[3].err.msg == "the model failed on this request; the server log has the details"
    assert any("kernel exploded" in line for line in logged)  # the details: in the server log only


# ---- a real server on loopback ---------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# The server's interpreter: PyTriton's Python-backend stub needs numpy<2, so where this venv has
# numpy 2 the server runs from another one (.ci/run makes it: pip install -e ".[serve]").
SERVE_PYTHON = os.environ.get("ASAP_SERVE_PYTHON") or sys.executable


def _server_reason() -> str | None:
    if importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("geventhttpclient") is None:
        return "tritonclient with HTTP support is not installed (pip install 'tritonclient[grpc,http]')"
    if SERVE_PYTHON != sys.executable:
        if not os.access(SERVE_PYTHON, os.X_OK):
            return f"ASAP_SERVE_PYTHON={SERVE_PYTHON} is not an executable interpreter"
        return None
    if importlib.util.find_spec("pytriton") is None:
        return "PyTriton is not installed (pip install 'asap-deploy[serve]'); the [test] extra leaves it out"
    if int(np.__version__.split(".")[0]) >= 2:
        return (f"numpy {np.__version__}: PyTriton's Python backend stub needs numpy<2 (it pins it); give a venv "
                "made with pip install 'asap-deploy[serve]' as ASAP_SERVE_PYTHON=/path/to/its/bin/python")
    return None


class _Server:
    """A real `asap serve` on loopback ports, started once for this module's served tests."""

    def __init__(self, bundle_dir: Path, log_path: Path):
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([SERVE_PYTHON, str(ROOT / "cli.py"), "serve", str(bundle_dir), "--backend",
                                      "onnxruntime", "--port", str(self.http), "--grpc-port", str(self.grpc),
                                      "--metrics-port", str(self.metrics), "--max-batch", "8", "--max-delay-ms", "20"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.rc: int | None = None

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def wait_ready(self) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http}")
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, self.log_tail()
            try:
                if client.is_model_ready("asap"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert time.monotonic() < deadline, "server not ready in 90 s:\n" + self.log_tail()
            time.sleep(0.5)
        client.close()

    def stop(self) -> int:
        if self.rc is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.rc = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.rc = self.proc.wait(10)
                raise
            finally:
                self.log.close()
        return self.rc


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    if _server_reason() is not None:
        pytest.skip(str(_server_reason()))
    srv = _Server(bundle_dir, tmp_path_factory.mktemp("served") / "serve.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.rc is None:
            try:
                srv.stop()
            except subprocess.TimeoutExpired:
                pass


def _send(port: int, a: np.ndarray, dtype: str | None = None, protocol: str = "http") -> np.ndarray:
    """One request from a client of its own (gevent HTTP clients are per thread)."""
    if protocol == "grpc":
        import tritonclient.grpc as client_mod
    else:
        import tritonclient.http as client_mod
    t = client_mod.InferInput("labels", list(a.shape), dtype or ("INT32" if a.dtype == np.int32 else "UINT8"))
    t.set_data_from_numpy(a)
    c = client_mod.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        return c.infer("asap", [t]).as_numpy("image")
    finally:
        c.close()


def test_served_model_end_to_end(server, engine):
    import tritonclient.http as httpclient

    rng = np.random.default_rng(1)
    goods = [rng.integers(0, 6, (1, h, w)).astype(np.uint8) for h, w in [(16, 24), (32, 32), (8, 64)] * 6]
    bads = [(ids(h=12), "multiples of S=8"), (ids(h=16, w=40, value=7), "label id 7"),
            (ids(dtype=np.int32), "INT32"), (np.zeros((1, 16), np.uint8), "batch dimension")]

    def bad_call(item):
        a, want = item
        try:
            _send(server.http, a)
        except Exception as exc:  # noqa: BLE001 - the client raises its own error type
            return want in str(exc), str(exc)[-300:]
        return False, "no error"

    with ThreadPoolExecutor(8) as pool:
        good_f = [pool.submit(_send, server.http, a) for a in goods]
        bad_f = [pool.submit(bad_call, b) for b in bads]
        for a, f in zip(goods, good_f):
            assert np.array_equal(f.result(), engine.run(a)), a.shape
        for f in bad_f:
            ok, msg = f.result()
            assert ok, msg
    assert np.array_equal(_send(server.http, goods[0]), engine.run(goods[0]))  # still serving after the bad ones
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
    assert client.is_server_live()
    client.close()
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10).read().decode()
    assert 'nv_inference_request_success{model="asap"' in text

    from asap_deploy.app.loadtest import LoadOptions, run_loadtest

    rep = run_loadtest(LoadOptions(url=f"grpc://127.0.0.1:{server.grpc}", concurrency=4, requests=20,
                                   sizes=[(16, 24), (32, 32)], label_nc=6)).to_dict()
    assert rep["requests_ok"] == 20 and rep["errors"] == 0
    assert rep["latency_ms"]["min"] <= rep["latency_ms"]["median"] <= rep["latency_ms"]["p99"]


def _client_error(exc: Exception) -> tuple[str, str]:
    """(status, message) of a tritonclient error (HTTP: '400'; gRPC: 'StatusCode.INVALID_ARGUMENT')."""
    status = exc.status() if hasattr(exc, "status") else None
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return str(status), str(message)


def _assert_clean_client_error(status: str, message: str, want: str, protocol: str) -> None:
    assert want in message, (status, message)
    assert status == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"), (status, message)
    assert "\n" not in message.strip() and "Traceback" not in message, message
    assert ".py" not in message and not re.search(r"/[\w.-]+/[\w.-]+", message), message  # no server file paths


def _metric(port: int, name: str, model: str = "asap") -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
    assert found, f"no {name} for {model} in the metrics"
    return float(found.group(1))


def test_served_bad_requests_harm_no_one(server, engine):
    """50 concurrent requests of one size, 10 of them bad (ids out of range): the dynamic batcher puts
    bad and good requests into the same batches; every good one gets its own right image, every bad
    one its own one-line client error. Plus bad requests of other kinds, over HTTP and gRPC."""
    rng = np.random.default_rng(7)
    reqs = []
    for i in range(50):
        a = rng.integers(0, 6, (1, 16, 24)).astype(np.uint8)
        if i % 5 == 2:
            a[0, 3, 4] = 9  # same size and dtype as the good ones: batched with them
        reqs.append(a)

    def call(a):
        try:
            return _send(server.http, a), None
        except Exception as exc:  # noqa: BLE001 - the client raises its own error type
            return None, _client_error(exc)

    execs = _metric(server.metrics, "nv_inference_exec_count")
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(call, reqs))
    batches = _metric(server.metrics, "nv_inference_exec_count") - execs
    assert batches < 25, f"{batches:g} executions for 50 requests: the batcher did not mix them"
    wrong = []
    for i, (a, (img, err)) in enumerate(zip(reqs, results)):
        if i % 5 == 2:
            assert img is None, f"request {i} (id 9) was answered with an image"
            _assert_clean_client_error(*err, r"label id 9 at (x=4, y=3) is out of range", "http")
        elif err is not None or not np.array_equal(img, engine.run(a)):
            wrong.append((i, err))
    assert not wrong, f"{len(wrong)} of 40 good requests failed or were wrong: {wrong[:3]}"

    # other kinds (too many pixels: see the unit tests; the server's limit is 64 Mpx here)
    kinds = [(ids(h=12), "multiples of S=8"), (ids(h=0), "an empty 24x0"), (ids(w=0), "an empty 0x16"),
             (ids(n=0), "labels"), (ids(dtype=np.int32), "INT32"), (np.zeros((1, 16), np.uint8), "unexpected shape"),
             (ids(n=9), "batch-size must be <= 8")]
    for protocol, port in (("http", server.http), ("grpc", server.grpc)):
        for a, want in kinds:
            with pytest.raises(Exception) as info:  # noqa: PT011 - the client raises its own error type
                _send(port, a, protocol=protocol)
            _assert_clean_client_error(*_client_error(info.value), want, protocol)
    good = reqs[0]
    assert np.array_equal(_send(server.grpc, good, protocol="grpc"), engine.run(good))  # still serving


def test_served_model_stops_cleanly(server):
    rc = server.stop()
    assert rc == 0, server.log_tail()
    assert "server stopped" in server.log_path.read_text()
    deadline = time.monotonic() + 20  # children of the server (tritonserver, backend stubs) exit after it
    while True:
        left = subprocess.run(["pgrep", "-s", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ps = subprocess.run(["ps", "-o", "pid,stat,args", "-p", ",".join(left)], capture_output=True, text=True).stdout if left else ""
    assert not left, f"processes left in the server's session:\n{ps}"
