"""`asap loadtest URL`: load a Triton server's `asap` model with tritonclient's asyncio clients.

N workers (--concurrency) each send one request at a time (random label maps of the given
sizes, ids drawn from the model's label set) until --requests have been sent or --duration has
passed, whichever comes first; both are bounded, and each request has a timeout. Latency is the
client-side time of one request (encode, send, server queue + batch + compute, receive, decode).
Reported: throughput (successful requests/s and pixels/s over the wall time), latency
min/median/p90/p99/max (trtexec's percentile rule, as in `asap bench`), error count and the
first distinct error messages. URL: http://HOST:PORT (HTTP) or grpc://HOST:PORT.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError, MissingDependencyError, UsageError
from ..limits import MAX_SIDE, check_max_pixels, check_optional, check_pixels, check_range, check_seed, parse_size

MAX_REQUESTS = 1_000_000
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 1024
MAX_SIZES = 16
MAX_LABEL_NC = 65536


@dataclass
class LoadOptions:
    url: str = "http://127.0.0.1:8000"
    model: str = "asap"
    concurrency: int = 1
    requests: int | None = 100
    duration_s: float | None = None
    sizes: Sequence[tuple[int, int]] = ((256, 256),)  # (H, W)
    label_nc: int | None = None    # None: from the model config's parameters (asap export --triton-repo), else 1
    timeout_s: float = 60.0
    seed: int = 0
    max_pixels: int = 64 * 1024 * 1024  # all the --size label maps together (they are held in memory)

    def check(self) -> None:
        parse_url(self.url)
        check_range("--concurrency", self.concurrency, 1, MAX_CONCURRENCY)
        if self.requests is None and self.duration_s is None:
            raise UsageError("give --requests N or --duration S (a load test is always bounded)")
        check_optional("--requests", self.requests, 1, MAX_REQUESTS)
        check_optional("--duration", self.duration_s, 0.0, MAX_DURATION_S, lo_open=True, unit="seconds")
        if not self.sizes:
            raise UsageError("give at least one --size WxH")
        if len(self.sizes) > MAX_SIZES:
            raise UsageError(f"--size given {len(self.sizes)} times: at most {MAX_SIZES} sizes")
        check_max_pixels("--max-pixels", self.max_pixels)
        for h, w in self.sizes:
            check_range("--size height", h, 1, MAX_SIDE)
            check_range("--size width", w, 1, MAX_SIDE)
        total = sum(h * w for h, w in self.sizes)
        check_pixels("--size", ", ".join(f"{w}x{h}" for h, w in self.sizes), total, self.max_pixels)
        check_optional("--label-nc", self.label_nc, 1, MAX_LABEL_NC)
        check_range("--timeout", self.timeout_s, 0.0, 3600.0, lo_open=True, unit="seconds")
        check_seed("seed", self.seed)


def parse_url(url: str) -> tuple[str, str]:
    """'http://h:p' / 'grpc://h:p' / 'h:p' (HTTP) -> (protocol, 'h:p')."""
    proto, sep, rest = url.partition("://")
    if not sep:
        proto, rest = "http", url
    if proto not in ("http", "grpc"):
        raise UsageError(f"{url}: the URL must start with http:// or grpc://")
    rest = rest.rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{url}: expected {proto}://HOST:PORT")
    return proto, rest


def parse_wxh(text: str) -> tuple[int, int]:
    """'WxH' or 'N' (square) -> (H, W); sides in 1..MAX_SIDE, else UsageError naming --size."""
    return parse_size("--size", text, "WxH")


def percentile(sorted_samples: Sequence[float], p: float) -> float:
    from asap_deploy.engines.bench import percentile as _p

    return _p(sorted_samples, p)


@dataclass
class LoadReport:
    url: str
    protocol: str
    model: str
    concurrency: int
    sizes: list[tuple[int, int]]
    wall_s: float
    latencies_ms: list[float] = field(default_factory=list)  # successful requests
    errors: int = 0
    error_messages: dict[str, int] = field(default_factory=dict)
    pixels: int = 0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def to_dict(self) -> dict:
        s = sorted(self.latencies_ms)
        lat = ({"min": s[0], "median": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99),
                "max": s[-1], "mean": float(np.mean(s))} if s else {})
        return {"url": self.url, "protocol": self.protocol, "model": self.model, "concurrency": self.concurrency,
                "sizes": [f"{w}x{h}" for h, w in self.sizes], "requests_ok": self.ok, "errors": self.errors,
                "error_messages": dict(list(self.error_messages.items())[:5]), "wall_s": self.wall_s,
                "throughput_rps": self.ok / self.wall_s if self.wall_s > 0 else 0.0,
                "megapixels_per_s": self.pixels / 1e6 / self.wall_s if self.wall_s > 0 else 0.0,
                "latency_ms": lat}


def _clients(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc.aio as mod
        else:
            import tritonclient.http.aio as mod
    except ImportError as exc:
        raise MissingDependencyError("asap loadtest needs tritonclient: pip install 'asap-deploy[serve]'") from exc
    return mod


async def _label_info(client, protocol: str, model: str, label_nc: int | None) -> tuple[str, str | None, int]:
    """(labels datatype, instances datatype or None, number of ids to draw from)."""
    cfg = await client.get_model_config(model)
    if protocol == "grpc":
        from google.protobuf.json_format import MessageToDict

        cfg = MessageToDict(cfg.config, preserving_proto_field_name=True)
    inputs = {i["name"]: i["data_type"].replace("TYPE_", "") for i in cfg.get("input", [])}
    if "labels" not in inputs:
        raise InputError(f"model {model!r} has no 'labels' input (inputs: {', '.join(inputs) or 'none'}): not an asap model")
    if label_nc is None:
        params = cfg.get("parameters", {}) or {}
        label_nc = int(params.get("label_nc", {}).get("string_value", 1))
    return inputs["labels"], inputs.get("instances"), max(1, label_nc)


async def _run(opts: LoadOptions, progress: Callable[[int], None] | None) -> LoadReport:
    protocol, target = parse_url(opts.url)
    mod = _clients(protocol)
    client = mod.InferenceServerClient(target)
    try:
        try:
            ready = await client.is_model_ready(opts.model)
        except Exception as exc:  # noqa: BLE001 - connection errors of two client libraries
            raise InputError(f"{opts.url}: cannot reach the server ({type(exc).__name__}: {exc})") from exc
        if not ready:
            raise InputError(f"{opts.url}: model {opts.model!r} is not ready")
        lab_type, inst_type, n_ids = await _label_info(client, protocol, opts.model, opts.label_nc)
        rng = np.random.default_rng(opts.seed)
        np_type = {"UINT8": np.uint8, "INT32": np.int32}.get(lab_type)
        if np_type is None:
            raise InputError(f"model {opts.model!r} takes labels of type {lab_type}, not UINT8/INT32")
        payloads = []
        for h, w in opts.sizes:
            arrays = {"labels": rng.integers(0, min(n_ids, 256 if np_type == np.uint8 else n_ids),
                                             (1, h, w)).astype(np_type)}
            if inst_type:
                arrays["instances"] = rng.integers(0, 4, (1, h, w)).astype(np.int32)
            inputs = []
            for name, a in arrays.items():
                t = mod.InferInput(name, list(a.shape), "UINT8" if a.dtype == np.uint8 else "INT32")
                t.set_data_from_numpy(a)
                inputs.append(t)
            payloads.append((inputs, h * w))
        report = LoadReport(opts.url, protocol, opts.model, opts.concurrency, list(opts.sizes), 0.0)
        budget = opts.requests if opts.requests is not None else MAX_REQUESTS
        sent = [0]
        deadline = time.perf_counter() + (opts.duration_s if opts.duration_s is not None else MAX_DURATION_S)

        async def worker() -> None:
            while sent[0] < budget and time.perf_counter() < deadline:
                inputs, pixels = payloads[sent[0] % len(payloads)]
                sent[0] += 1
                t0 = time.perf_counter()
                try:
                    res = await asyncio.wait_for(client.infer(opts.model, inputs), timeout=opts.timeout_s)
                    img = res.as_numpy("image")
                    if img is None:
                        raise InputError("the response has no 'image' output")
                except Exception as exc:  # noqa: BLE001 - an error response of any kind is counted, not raised
                    report.errors += 1
                    msg = (str(exc) or type(exc).__name__).strip().splitlines()[-1][:300]
                    report.error_messages[msg] = report.error_messages.get(msg, 0) + 1
                else:
                    report.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                    report.pixels += pixels
                if progress:
                    progress(report.ok + report.errors)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(opts.concurrency)))
        report.wall_s = time.perf_counter() - t0
        return report
    finally:
        await client.close()


def run_loadtest(opts: LoadOptions, progress: Callable[[int], None] | None = None) -> LoadReport:
    """Run the load test (blocking; its own event loop)."""
    opts.check()
    return asyncio.run(_run(opts, progress))


def check_report_file(json_file: Path, overwrite: bool) -> None:
    """--json: a file (never a FIFO or device) that is new, or one an earlier loadtest wrote when
    overwrite is set; checked before connecting."""
    from ..io import check_file_replaceable
    from ..limits import check_output_file

    check_output_file("--json", json_file)
    check_file_replaceable(json_file, "load-test report", overwrite)


def write_report(json_file: Path, report: dict) -> None:
    """The JSON report, claimed as ours (replaceable by the next loadtest) and written atomically."""
    import json

    from ..io import claim_files, write_text

    claim_files(json_file.parent, "load-test report", [json_file.name])
    write_text(json_file, json.dumps(report, indent=2) + "\n")
