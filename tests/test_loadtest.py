"""`asap loadtest` without a server: URL and size parsing, bounds, the report's statistics, an
unreachable server. (Against a real server: tests/test_serve.py, where PyTriton runs.)"""

from __future__ import annotations

import socket

import pytest

from asap_deploy.errors import InputError, UsageError
from asap_deploy.app.loadtest import LoadOptions, LoadReport, parse_url, parse_wxh, run_loadtest


@pytest.mark.parametrize("url, want", [("http://127.0.0.1:8000", ("http", "127.0.0.1:8000")),
                                       ("grpc://localhost:8001/", ("grpc", "localhost:8001")),
                                       ("127.0.0.1:9", ("http", "127.0.0.1:9"))])
def test_parse_url(url, want):
    assert parse_url(url) == want


@pytest.mark.parametrize("url", ["ftp://h:1", "http://h", "http://h:99999", "grpc://:80"])
def test_bad_urls(url):
    with pytest.raises(UsageError, match="URL must start|HOST:PORT"):
        parse_url(url)


def test_sizes_are_wxh():
    assert parse_wxh("512x256") == (256, 512) and parse_wxh("64") == (64, 64)
    with pytest.raises(UsageError, match="expected WxH"):
        parse_wxh("big")


@pytest.mark.parametrize("kw, msg", [({"concurrency": 0}, "--concurrency"), ({"requests": None}, "always bounded"),
                                     ({"requests": 0}, "--requests"), ({"requests": None, "duration_s": 0}, "--duration"),
                                     ({"sizes": []}, "--size"), ({"sizes": [(0, 4)]}, "--size height must be in 1..65536"),
                                     ({"timeout_s": 0}, "--timeout")])
def test_bounds(kw, msg):
    with pytest.raises(UsageError, match=msg):
        LoadOptions(**kw).check()


def test_report_statistics():
    rep = LoadReport("grpc://h:1", "grpc", "asap", 4, [(16, 32)], wall_s=2.0,
                     latencies_ms=[float(v) for v in range(1, 101)], errors=3,
                     error_messages={"bad": 3}, pixels=100 * 512).to_dict()
    assert rep["requests_ok"] == 100 and rep["errors"] == 3 and rep["throughput_rps"] == 50.0
    lat = rep["latency_ms"]
    assert lat["min"] == 1 and lat["max"] == 100 and lat["median"] == 50 and lat["p90"] == 90 and lat["p99"] == 99
    assert rep["sizes"] == ["32x16"]
    empty = LoadReport("u", "http", "asap", 1, [(8, 8)], wall_s=1.0).to_dict()
    assert empty["latency_ms"] == {} and empty["throughput_rps"] == 0


def test_unreachable_server_is_a_clear_error():
    pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] is not installed")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(InputError, match="cannot reach the server"):
        run_loadtest(LoadOptions(url=f"grpc://127.0.0.1:{port}", requests=1, timeout_s=5))


def test_cli_help_without_server():
    from typer.testing import CliRunner

    from asap_deploy.cli import app

    r = CliRunner().invoke(app, ["loadtest", "--help"])
    assert r.exit_code == 0 and "--concurrency" in r.output
    r = CliRunner().invoke(app, ["loadtest", "ftp://x:1"])
    assert r.exit_code == 2 and "http:// or grpc://" in r.output
