"""`asap serve`: the libpython fix, the numpy<2 guard, options, request validation and the
batched infer callable without a server; then a real server on loopback (PyTriton, in this venv
if it has numpy<2, else in the one ASAP_SERVE_PYTHON names, as .ci/run does)."""

from __future__ import annotations

import importlib.util
import os
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

from asap_deploy import serve
from asap_deploy.config import ModelConfig
from asap_deploy.errors import InputError, MissingDependencyError, UsageError
from asap_deploy.serve import ServeOptions, make_infer_fn, validate_request

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
    ({"labels": ids(h=0)}, "outside the served range"),
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
    from asap_deploy.export.synthetic import random_generator

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
    with pytest.raises(InputError, match=r"request 2 of 3 in this batch: label id 9 .*not run: send them again"):
        make_infer_fn(engine)([good, bad, good])
    with pytest.raises(InputError, match=r"^label id 9"):
        make_infer_fn(engine)([bad])
    assert make_infer_fn(engine)([good])[0]["image"].shape == (1, 16, 24, 3)  # still serving


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


@pytest.mark.skipif(_server_reason() is not None, reason=str(_server_reason()))
def test_served_model_end_to_end(bundle_dir, engine, tmp_path):
    import tritonclient.http as httpclient

    http, grpc, metrics = _free_ports(3)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([SERVE_PYTHON, str(ROOT / "cli.py"), "serve", str(bundle_dir), "--backend", "onnxruntime",
                             "--port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             "--max-batch", "4", "--max-delay-ms", "5"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if client.is_model_ready("asap"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert time.monotonic() < deadline, "server not ready in 90 s:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)

        rng = np.random.default_rng(1)

        def send(a: np.ndarray, dtype: str = "UINT8"):
            t = httpclient.InferInput("labels", list(a.shape), dtype)
            t.set_data_from_numpy(a)
            c = httpclient.InferenceServerClient(f"127.0.0.1:{http}")  # gevent clients are per thread
            try:
                return c.infer("asap", [t]).as_numpy("image")
            finally:
                c.close()

        goods = [rng.integers(0, 6, (1, h, w)).astype(np.uint8) for h, w in [(16, 24), (32, 32), (8, 64)] * 6]
        bads = [(ids(h=12), "multiples of S=8"), (ids(h=16, w=40, value=7), "label id 7"),
                (ids(dtype=np.int32), "INT32"), (np.zeros((1, 16), np.uint8), "batch dimension")]

        def bad_call(item):
            a, want = item
            try:
                send(a, "INT32" if a.dtype == np.int32 else "UINT8")
            except Exception as exc:  # noqa: BLE001 - the client raises its own error type
                return want in str(exc), str(exc)[-300:]
            return False, "no error"

        with ThreadPoolExecutor(8) as pool:
            good_f = [pool.submit(send, a) for a in goods]
            bad_f = [pool.submit(bad_call, b) for b in bads]
            for a, f in zip(goods, good_f):
                assert np.array_equal(f.result(), engine.run(a)), a.shape
            for f in bad_f:
                ok, msg = f.result()
                assert ok, msg
        assert np.array_equal(send(goods[0]), engine.run(goods[0]))  # still serving after the bad ones
        assert client.is_server_live()
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        assert 'nv_inference_request_success{model="asap"' in text

        from asap_deploy.loadtest import LoadOptions, run_loadtest

        rep = run_loadtest(LoadOptions(url=f"grpc://127.0.0.1:{grpc}", concurrency=4, requests=20,
                                       sizes=[(16, 24), (32, 32)], label_nc=6)).to_dict()
        assert rep["requests_ok"] == 20 and rep["errors"] == 0
        assert rep["latency_ms"]["min"] <= rep["latency_ms"]["median"] <= rep["latency_ms"]["p99"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "server stopped" in (tmp_path / "serve.log").read_text()
    deadline = time.monotonic() + 20  # children of the server (tritonserver, backend stubs) exit after it
    while True:
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ps = subprocess.run(["ps", "-o", "pid,stat,args", "-p", ",".join(left)], capture_output=True, text=True).stdout if left else ""
    assert not left, f"processes left in the server's session:\n{ps}"
