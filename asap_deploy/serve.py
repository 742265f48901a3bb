"""`asap serve`: the model behind NVIDIA Triton Inference Server, run through PyTriton.

PyTriton (`pip install 'asap-deploy[serve]'`) starts the tritonserver binary its wheel bundles and
hands each batch of requests to a Python callable in this process; that callable runs one Engine
(onnxruntime, tensorrt or torch). Triton does the rest: HTTP (port 8000) and gRPC (8001)
endpoints, health (`/v2/health/live`, `/v2/health/ready`), Prometheus metrics (8002, `/metrics`),
and the dynamic batcher, which only puts requests of the same shape into one batch.

The model `asap`:
  inputs   labels     uint8 (int32 when the model has > 255 labels), shape (-1, -1) per request
           instances  int32, shape (-1, -1)      only for models that use instance edges
  outputs  image      uint8 RGB, shape (-1, -1, 3)
H and W must be multiples of S (the client pads: see `asap_deploy.infer.pad_to_multiple`).

Bad requests get an error response naming the problem and the server goes on: Triton itself
rejects a wrong dtype or rank; `validate_request` rejects ids out of range, sizes that are not
multiples of S and sizes over `max_pixels`. PyTriton answers one callable call with results for
all its requests or one error for all of them, so a bad request that the batcher put into a
batch with good ones of the same size fails that batch; the error names the bad request.

Two traps on the way, both handled here:
  * the Python backend stub links the system libpython3.X.so while a venv/pyenv interpreter is
    another build of 3.X: models fail to load with "'_thread.RLock' object has no attribute
    '_recursion_count'". `libpython_env` puts the running interpreter's LIBDIR first on
    LD_LIBRARY_PATH before the server starts.
  * PyTriton 0.7's stub reads request tensors through a pybind11 numpy binding that is wrong under
    numpy 2 (every element reads as the first one: silently wrong images). PyTriton pins numpy<2;
    `check_serve_dependencies` refuses to start under numpy 2 instead of serving wrong pictures.
"""

from __future__ import annotations

import os
import signal
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import ModelConfig
from .errors import InputError, MissingDependencyError, UsageError
from .io import sigterm_as_interrupt

MODEL_NAME = "asap"
LABELS, INSTANCES, IMAGE = "labels", "instances", "image"
DEFAULT_MAX_PIXELS = 4096 * 4096  # per request; larger requests are refused (memory, latency)
SERVE_EXTRA = "pip install 'asap-deploy[serve]'"


# ---- environment ------------------------------------------------------------------------------
def libpython_dir() -> str | None:
    """The folder of the running interpreter's libpython (None for static builds)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    return str(libdir) if libdir else None


def libpython_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) with the interpreter's LIBDIR first on LD_LIBRARY_PATH."""
    env = dict(os.environ if env is None else env)
    libdir = libpython_dir()
    if not libdir:
        return env
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir] + parts)
    return env


def apply_libpython_fix() -> str:
    """Set LD_LIBRARY_PATH in this process's environment (PyTriton copies it into the server's)."""
    env = libpython_env()
    if "LD_LIBRARY_PATH" in env:
        os.environ["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"]
    return os.environ.get("LD_LIBRARY_PATH", "")


def check_serve_dependencies(numpy_version: str | None = None) -> None:
    """MissingDependencyError unless PyTriton is importable and numpy is 1.x (see the module doc)."""
    import importlib.util

    if importlib.util.find_spec("pytriton") is None:
        raise MissingDependencyError(f"asap serve needs PyTriton (it bundles Triton Inference Server): {SERVE_EXTRA}")
    version = numpy_version or np.__version__
    if int(version.split(".")[0]) >= 2:
        raise MissingDependencyError(
            f"asap serve: PyTriton's Python backend stub misreads request tensors under numpy {version} "
            "(PyTriton requires numpy<2). Serve from an environment made for it, e.g. "
            "python -m venv serve-env && serve-env/bin/pip install 'asap-deploy[serve]' (pip then picks numpy<2), "
            "or point a standalone tritonserver at `asap export --triton-repo`.")


# ---- options ------------------------------------------------------------------------------------
def check_batching(max_batch: int, max_delay_ms: float) -> None:
    """The dynamic-batching options, alike for `asap serve` and `asap export --triton-repo`."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1 (got {max_batch})")
    if not 0 <= max_delay_ms <= 10_000:
        raise UsageError(f"--max-delay-ms must be in 0..10000 (got {max_delay_ms:g})")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000           # HTTP
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    max_delay_ms: float = 2.0  # dynamic batcher: how long a request may wait for others of its size
    max_pixels: int = DEFAULT_MAX_PIXELS
    exit_timeout_s: int = 10   # graceful shutdown: in-flight requests get this long

    def check(self) -> None:
        ports = {"--port": self.port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, p in ports.items():
            if not 1 <= p <= 65535:
                raise UsageError(f"{flag} {p} is not a TCP port (1..65535)")
        if len(set(ports.values())) != 3:
            raise UsageError(f"--port, --grpc-port and --metrics-port must differ (got {', '.join(map(str, ports.values()))})")
        check_batching(self.max_batch, self.max_delay_ms)
        if self.max_pixels < 1:
            raise UsageError(f"max_pixels must be >= 1 (got {self.max_pixels})")
        if not self.host:
            raise UsageError("--host must not be empty")


def model_inputs(cfg: ModelConfig) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, per-request shape) of the served model's inputs."""
    out = [(LABELS, np.dtype(cfg.label_dtype), (-1, -1))]
    if cfg.instance_edges:
        out.append((INSTANCES, np.dtype(np.int32), (-1, -1)))
    return out


def model_outputs(cfg: ModelConfig) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    return [(IMAGE, np.dtype(np.uint8), (-1, -1, cfg.output_nc))]


# ---- request validation -----------------------------------------------------------------------------
def validate_request(request: dict[str, np.ndarray], cfg: ModelConfig,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray | None]:
    """One request's arrays (each (N, H, W): Triton adds the batch axis) -> (labels, instances),
    or InputError naming the problem. Checks what Triton's own shape/dtype checks cannot."""
    if LABELS not in request:
        raise InputError(f"the request has no '{LABELS}' input")
    labels = np.asarray(request[LABELS])
    want = np.dtype(cfg.label_dtype)
    if labels.dtype != want:
        raise InputError(f"'{LABELS}' must be {want.name} label ids, got {labels.dtype.name}")
    if labels.ndim != 3:
        raise InputError(f"'{LABELS}' must be (H, W) label ids per request, got shape {labels.shape[1:]}")
    n, h, w = labels.shape
    if h * w > max_pixels or h == 0 or w == 0:
        raise InputError(f"a {w}x{h} (WxH) label map is outside the served range: 1..{max_pixels} pixels per request")
    S = cfg.S  # noqa: N806
    if h % S or w % S:
        raise InputError(f"a {w}x{h} (WxH) label map: W and H must be multiples of S={S}; pad it to "
                         f"{-(-w // S) * S}x{-(-h // S) * S} (reflect, bottom/right) and crop the image back")
    ids = labels.astype(np.int64, copy=False)
    bad = cfg.invalid_label_ids(ids)
    if bad.any():
        y, x = (int(v) for v in np.argwhere(bad)[0][1:])
        raise InputError(f"label id {int(ids[bad].flat[0])} at (x={x}, y={y}) is out of range: this model takes ids "
                         f"{cfg.allowed_label_ids}")
    instances = None
    if cfg.instance_edges:
        if INSTANCES not in request:
            raise InputError(f"this model uses instance edges: the request needs an '{INSTANCES}' input (int32 ids)")
        instances = np.asarray(request[INSTANCES])
        if instances.dtype != np.int32:
            raise InputError(f"'{INSTANCES}' must be int32 instance ids, got {instances.dtype.name}")
        if instances.shape != labels.shape:
            raise InputError(f"'{INSTANCES}' has shape {instances.shape[1:]}, '{LABELS}' {labels.shape[1:]}: they must match")
    return labels, instances


def make_infer_fn(engine, max_pixels: int = DEFAULT_MAX_PIXELS) -> Callable[[Sequence[dict]], list[dict]]:
    """The callable PyTriton runs: a list of requests (dicts of arrays) -> a list of {"image": ...}.

    Every request is validated first; if any is bad, one InputError names each bad request and
    nothing runs. Requests of the same size go through the engine as one batch."""
    cfg: ModelConfig = engine.config

    def infer_fn(requests: Sequence[dict]) -> list[dict]:
        checked, problems = [], []
        for i, req in enumerate(requests):
            try:
                checked.append(validate_request(req, cfg, max_pixels))
            except InputError as exc:
                problems.append(exc.message if len(requests) == 1 else f"request {i + 1} of {len(requests)} in this "
                                f"batch: {exc.message}")
        if problems:
            others = (" (the other requests of this batch were not run: send them again)"
                      if len(problems) < len(requests) else "")
            raise InputError("; ".join(problems) + others)
        groups: dict[tuple, list[int]] = {}
        for i, (lab, _) in enumerate(checked):
            groups.setdefault(lab.shape[1:], []).append(i)
        out: list[dict | None] = [None] * len(checked)
        for idx in groups.values():
            labels = np.concatenate([checked[i][0] for i in idx])
            inst = np.concatenate([checked[i][1] for i in idx]) if cfg.instance_edges else None
            images = engine.run(labels, inst)
            start = 0
            for i in idx:
                n = checked[i][0].shape[0]
                out[i] = {IMAGE: images[start:start + n]}
                start += n
        return out  # type: ignore[return-value]

    return infer_fn


# ---- the server ---------------------------------------------------------------------------------------
@dataclass
class Endpoints:
    http: str
    grpc: str
    metrics: str
    model: str = MODEL_NAME

    def to_dict(self) -> dict:
        return {"http": self.http, "grpc": self.grpc, "metrics": self.metrics, "model": self.model,
                "health": self.http + "/v2/health/ready", "infer": f"{self.http}/v2/models/{self.model}/infer"}


def endpoints(opts: ServeOptions) -> Endpoints:
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return Endpoints(f"http://{host}:{opts.port}", f"{host}:{opts.grpc_port}", f"http://{host}:{opts.metrics_port}/metrics")


def serve(engine, opts: ServeOptions, on_ready: Callable[[Endpoints], None] | None = None,
          workspace: Path | None = None) -> None:
    """Serve `engine` as model `asap` until SIGINT/SIGTERM (or the server dies); blocks.

    Call from the main thread (signal handlers). The engine is not closed here."""
    opts.check()
    check_serve_dependencies()
    apply_libpython_fix()
    from pytriton.model_config import DynamicBatcher, ModelConfig as PTModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    cfg: ModelConfig = engine.config
    tcfg = TritonConfig(http_address=opts.host, http_port=opts.port, grpc_address=opts.host, grpc_port=opts.grpc_port,
                        metrics_address=opts.host, metrics_port=opts.metrics_port, allow_metrics=True,
                        allow_gpu_metrics=False, exit_timeout_secs=opts.exit_timeout_s)
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(round(opts.max_delay_ms * 1000)))
    mcfg = PTModelConfig(max_batch_size=opts.max_batch, batcher=batcher)
    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)  # PyTriton's serve() stops cleanly on it
    try:
        with Triton(config=tcfg, workspace=str(workspace) if workspace else None) as triton:
            triton.bind(model_name=MODEL_NAME, infer_func=make_infer_fn(engine, opts.max_pixels),
                        inputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in model_inputs(cfg)],
                        outputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in model_outputs(cfg)],
                        config=mcfg, strict=True)
            triton.run()
            if on_ready:
                on_ready(endpoints(opts))
            triton.serve()  # returns on SIGINT/SIGTERM (KeyboardInterrupt) after stopping the server
    finally:
        signal.signal(signal.SIGTERM, previous)
