"""`asap serve`: the model behind NVIDIA Triton Inference Server, run through PyTriton.

PyTriton (`pip install 'asap-deploy[serve]'`) starts the tritonserver binary its wheel bundles and
hands each batch of requests to a Python callable in this process; that callable runs one Engine
(onnxruntime, tensorrt or torch). Triton does the rest: HTTP (port 8000) and gRPC (8001)
endpoints, health (`/v2/health/live`, `/v2/health/ready`), Prometheus metrics (8002, `/metrics`),
and the dynamic batcher, which only puts requests of the same shape into one batch.

Two models, because PyTriton answers a batch all or nothing: its callable must return one dict of
arrays per request or raise, and a raised error goes to every request of the batch, as a Python
traceback with server file paths (pytriton/proxy/inference.py formats it, the proxy's model.py
wraps it in another one). So clients talk to
  `asap`         a Triton Python-backend model of our own (`FrontModel`, written into a temporary
                 model repository and loaded once `asap_engine` is). It has the dynamic batcher; it
                 checks every request on its own, answers a bad one with its own one-line error
                 (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT) and sends the good ones of each size,
                 joined, to
  `asap_engine`  the PyTriton-bound callable that runs the Engine in this process (it checks again,
                 for clients that call it directly; they get PyTriton's all-or-nothing answers).
The good requests pay one more hop inside the server (the BLS request: a shared-memory copy).

The model `asap`:
  inputs   labels     uint8 (int32 when the model has > 255 labels), shape (-1, -1) per request
           instances  int32, shape (-1, -1)      only for models that use instance edges
  outputs  image      uint8 RGB, shape (-1, -1, 3)
H and W must be multiples of S (the client pads: see `ModelConfig.pad_to_tiles`).

Bad requests get an error response naming the problem and the server goes on; a bad request never
fails another one batched with it. Triton itself rejects a wrong dtype or rank (HTTP 400);
`validate_request` rejects empty requests, ids out of range, sizes that are not multiples of S
and sizes over `max_pixels` (HTTP 400, one line, no traceback). An engine failure fails only the
requests that ran with it, with a one-line server error (HTTP 500; the details go to the log).

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

import json
import logging
import os
import shutil
import signal
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import ModelConfig
from ..errors import AsapError, InputError, MissingDependencyError, UsageError
from ..io import sigterm_as_interrupt

LOGGER = logging.getLogger(__name__)

MODEL_NAME = "asap"
ENGINE_MODEL = "asap_engine"  # the PyTriton-bound engine; clients use MODEL_NAME (see the module doc)
FRONT_SETTINGS = "asap_serve.json"
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
    # The rules are the model's (ModelConfig.fits_tiles / check_label_ids); the words are for a
    # client: sizes as WxH, the pixel named.
    if n == 0:
        raise InputError("an empty request: its batch dimension is 0 (send one or more label maps)")
    if h == 0 or w == 0:
        raise InputError(f"an empty {w}x{h} (WxH) label map: W and H must be positive multiples of S={cfg.S}")
    if h * w > max_pixels:
        raise InputError(f"a {w}x{h} (WxH) label map is outside the served range: 1..{max_pixels} pixels per request")
    if not cfg.fits_tiles(h, w):
        ph, pw = cfg.padded_size(h, w)
        raise InputError(f"a {w}x{h} (WxH) label map: W and H must be multiples of S={cfg.S}; pad it to "
                         f"{pw}x{ph} (reflect, bottom/right) and crop the image back")
    cfg.check_label_ids(labels, at="at (x={x}, y={y})")
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


class RequestFailed(AsapError):
    """A valid request that the model failed on (a server-side error; the details are in the log)."""


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else "error"


def answer_requests(requests: Sequence[Mapping[str, np.ndarray]], cfg: ModelConfig,
                    run: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray | AsapError]:
    """One answer per request of a batch: its image (N, H, W, 3) or its own error.

    Every request is checked on its own (`validate_request`): a bad one gets its InputError and
    touches no other. The good ones of one size go through `run(labels, instances)` as one call; if
    that call fails, only its requests get a RequestFailed (one line: the exception's type; the
    details go to the log)."""
    answers: list[np.ndarray | AsapError | None] = [None] * len(requests)
    groups: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray | None]]] = {}
    for i, req in enumerate(requests):
        try:
            labels, instances = validate_request(req, cfg, max_pixels)
        except InputError as exc:
            answers[i] = exc
            continue
        groups.setdefault(labels.shape[1:], []).append((i, labels, instances))
    for members in groups.values():
        labels = np.concatenate([m[1] for m in members]) if len(members) > 1 else members[0][1]
        instances = None
        if members[0][2] is not None:
            instances = np.concatenate([m[2] for m in members]) if len(members) > 1 else members[0][2]
        n, h, w = labels.shape
        error: AsapError | None = None
        try:
            images = np.asarray(run(labels, instances))
            if images.shape != (n, h, w, cfg.output_nc):
                raise RequestFailed(f"the engine returned images of shape {images.shape} for {n} label maps "
                                    f"of {w}x{h} (WxH)")
        except InputError as exc:
            error = InputError(_one_line(exc.message))
        except AsapError as exc:
            LOGGER.warning("the engine failed on %d label map(s) of %dx%d (WxH): %s", n, w, h, exc.message)
            error = RequestFailed(_one_line(exc.message))
        except Exception as exc:  # noqa: BLE001 - any engine failure fails only the requests run with it
            LOGGER.warning("the engine failed on %d label map(s) of %dx%d (WxH)", n, w, h, exc_info=True)
            error = RequestFailed(f"the model failed on this request ({type(exc).__name__}); the server log has "
                                  "the details")
        start = 0
        for i, lab, _ in members:
            k = lab.shape[0]
            answers[i] = error if error is not None else images[start:start + k]
            start += k
    return answers  # type: ignore[return-value]


def make_infer_fn(engine, max_pixels: int = DEFAULT_MAX_PIXELS) -> Callable[[Sequence[dict]], list[dict]]:
    """The callable PyTriton runs (model `asap_engine`): a list of requests (dicts of arrays) -> a
    list of {"image": ...}.

    PyTriton answers all requests of a call or raises one error for all of them, so a bad request
    here (only from a client that skips the `asap` front model) fails the call, naming it. Requests
    of the same size go through the engine as one batch."""
    cfg: ModelConfig = engine.config

    def infer_fn(requests: Sequence[dict]) -> list[dict]:
        answers = answer_requests(requests, cfg, engine.run, max_pixels)
        problems = [(i, a) for i, a in enumerate(answers) if not isinstance(a, np.ndarray)]
        if problems:
            many = len(requests) > 1
            text = "; ".join((f"request {i + 1} of {len(requests)} in this batch: " if many else "") + a.message
                             for i, a in problems)
            if len(problems) < len(requests):
                text += " (the other requests of this batch got no answer: send them again)"
            raise (InputError if all(isinstance(a, InputError) for _, a in problems) else RequestFailed)(text)
        return [{IMAGE: a} for a in answers]

    return infer_fn


# ---- the front model: Triton's Python backend answers every request on its own --------------------------
FRONT_MODEL_PY = '''"""Triton Python-backend model `asap`, written by `asap serve` into a temporary model
repository (see asap_deploy/app/serve.py): checks each request on its own and runs the good ones
through the model `asap_engine`."""

from pathlib import Path

from asap_deploy.app.serve import FrontModel


class TritonPythonModel(FrontModel):
    folder = Path(__file__).resolve().parent
'''

_TRITON_TYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32"}


def front_config_text(cfg: ModelConfig, opts: "ServeOptions") -> str:
    """config.pbtxt of the front model `asap` (protobuf text format of Triton's ModelConfig)."""
    def tensor(name: str, dtype: np.dtype, dims: tuple[int, ...]) -> str:
        return (f"  {{\n    name: \"{name}\"\n    data_type: {_TRITON_TYPES[np.dtype(dtype).name]}\n"
                f"    dims: [ {', '.join(map(str, dims))} ]\n  }}")

    params = {"S": cfg.S, "label_nc": cfg.n_label_channels, "accepts_dontcare_255": int(cfg.accepts_dontcare_id),
              "source": "asap-deploy serve"}
    lines = [f"name: \"{MODEL_NAME}\"", "backend: \"python\"", f"max_batch_size: {opts.max_batch}",
             "input [\n" + ",\n".join(tensor(*t) for t in model_inputs(cfg)) + "\n]",
             "output [\n" + ",\n".join(tensor(*t) for t in model_outputs(cfg)) + "\n]",
             "dynamic_batching {\n  max_queue_delay_microseconds: " + str(int(round(opts.max_delay_ms * 1000))) + "\n}",
             "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]"]
    for k, v in params.items():
        lines.append(f"parameters {{\n  key: \"{k}\"\n  value: {{ string_value: \"{v}\" }}\n}}")
    return "\n".join(lines) + "\n"


def write_front_model(repo: Path, cfg: ModelConfig, opts: "ServeOptions") -> Path:
    """Write the front model `asap` into the model repository `repo` (a folder this process made)."""
    folder = repo / MODEL_NAME
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(front_config_text(cfg, opts), encoding="utf-8")
    (folder / "1" / "model.py").write_text(FRONT_MODEL_PY, encoding="utf-8")
    settings = {"config": cfg.to_dict(), "max_pixels": opts.max_pixels, "engine_model": ENGINE_MODEL}
    (folder / "1" / FRONT_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return folder


class FrontModel:
    """The Triton Python-backend model `asap` (runs in the backend's stub process).

    Each request is checked on its own; the good ones of one size go to `asap_engine` as one BLS
    request; every request gets its own response: the image, or an error of one line (INVALID_ARG
    for a bad request, INTERNAL when the engine failed; no traceback, no file paths)."""

    folder: Path  # the version folder holding FRONT_SETTINGS (set by the generated model.py)

    def initialize(self, args: Mapping[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

        self.pb = pb_utils
        settings = json.loads((Path(self.folder) / FRONT_SETTINGS).read_text(encoding="utf-8"))
        self.cfg = ModelConfig.from_dict(settings["config"])
        self.max_pixels = int(settings["max_pixels"])
        self.engine_model = str(settings["engine_model"])
        self.inputs = [name for name, _, _ in model_inputs(self.cfg)]

    def _log_error(self, text: str) -> None:
        logger = getattr(self.pb, "Logger", None)
        if logger is not None and hasattr(logger, "log_error"):
            logger.log_error(text)
        else:
            LOGGER.error("%s", text)

    def _run(self, labels: np.ndarray, instances: np.ndarray | None) -> np.ndarray:
        """One BLS request to the engine model."""
        pb = self.pb
        tensors = [pb.Tensor(LABELS, np.ascontiguousarray(labels))]
        if instances is not None:
            tensors.append(pb.Tensor(INSTANCES, np.ascontiguousarray(instances)))
        response = pb.InferenceRequest(model_name=self.engine_model, inputs=tensors,
                                       requested_output_names=[IMAGE]).exec()
        if response.has_error():
            self._log_error(f"{self.engine_model} failed on {labels.shape[0]} label map(s) of shape "
                            f"{labels.shape[1:]}: {response.error().message()}")
            raise RequestFailed("the model failed on this request; the server log has the details")
        return pb.get_output_tensor_by_name(response, IMAGE).as_numpy()

    def _response(self, answer: np.ndarray | AsapError):
        pb = self.pb
        if isinstance(answer, np.ndarray):
            return pb.InferenceResponse(output_tensors=[pb.Tensor(IMAGE, np.ascontiguousarray(answer))])
        code = pb.TritonError.INVALID_ARG if isinstance(answer, InputError) else pb.TritonError.INTERNAL
        return pb.InferenceResponse(error=pb.TritonError(_one_line(answer.message), code))

    def execute(self, requests: Sequence[Any]) -> list:
        pb = self.pb
        try:
            arrays = []
            for request in requests:
                got = {}
                for name in self.inputs:
                    tensor = pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        got[name] = tensor.as_numpy()
                arrays.append(got)
            answers = answer_requests(arrays, self.cfg, self._run, self.max_pixels)
        except Exception as exc:  # noqa: BLE001 - answer every request, never the stub's traceback
            self._log_error(f"the asap front model failed on a batch of {len(requests)}: {type(exc).__name__}: {exc}")
            failed = RequestFailed(f"the server failed on this request ({type(exc).__name__}); its log has the details")
            answers = [failed] * len(requests)
        return [self._response(a) for a in answers]

    def finalize(self) -> None:
        pass


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


def local_http_url(opts: ServeOptions) -> str:
    """The HTTP endpoint as this machine reaches it (loopback for a wildcard --host)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(opts.host, opts.host)
    return f"http://[{host}]:{opts.port}" if ":" in host else f"http://{host}:{opts.port}"


def _load_model(url: str, name: str, access_token: str | None) -> None:
    """Load model `name` from the server's repository (its model-repository API may need PyTriton's token)."""
    from pytriton.client import ModelClient

    kwargs = {"access_token": access_token} if access_token else {}
    try:
        with ModelClient(url, name, **kwargs) as client:
            client.load_model()
    except Exception as exc:  # noqa: BLE001 - tritonclient's and PyTriton's error types
        raise AsapError(f"Triton could not load the model {name!r}: {_one_line(str(exc))} (the server log says why)") from exc


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
    repo = Path(tempfile.mkdtemp(prefix="asap-serve-models-"))  # ours alone: removed below
    previous = signal.signal(signal.SIGTERM, sigterm_as_interrupt)  # PyTriton's serve() stops cleanly on it
    try:
        tcfg = TritonConfig(http_address=opts.host, http_port=opts.port, grpc_address=opts.host,
                            grpc_port=opts.grpc_port, metrics_address=opts.host, metrics_port=opts.metrics_port,
                            allow_metrics=True, allow_gpu_metrics=False, exit_timeout_secs=opts.exit_timeout_s,
                            model_repository=repo)
        # the front model batches; it sends each size's good requests as one request of <= max_batch
        mcfg = PTModelConfig(max_batch_size=opts.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=0))
        with Triton(config=tcfg, workspace=str(workspace) if workspace else None) as triton:
            triton.bind(model_name=ENGINE_MODEL, infer_func=make_infer_fn(engine, opts.max_pixels),
                        inputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in model_inputs(cfg)],
                        outputs=[Tensor(name=n, dtype=d, shape=s) for n, d, s in model_outputs(cfg)],
                        config=mcfg, strict=True)
            # the front model after the engine model: `asap` is never ready while `asap_engine` is not.
            # The repository was empty at start, so the server loads it only when asked to.
            write_front_model(repo, cfg, opts)
            _load_model(local_http_url(opts), MODEL_NAME, getattr(triton, "get_access_token", lambda: None)())
            triton.run()
            if on_ready:
                on_ready(endpoints(opts))
            triton.serve()  # returns on SIGINT/SIGTERM (KeyboardInterrupt) after stopping the server
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(repo, ignore_errors=True)
