"""TensorRT backend: runs the engines `asap build-engine` wrote, with the TensorRT runtime
(`tensorrt` or `tensorrt_rtx`) and cuda-python. No torch, no Triton at run time: the SpatialMLP
plugin launches the AOT kernels its engine carries through the CUDA driver.

Opening an engine, in this order (each step refuses with a message saying what to do):
  1. the sidecar (engines/build.py): engine sha256, flavour, plugin version, the bundle's ONNX
     sha256, the installed TensorRT version: all without a GPU;
  2. a CUDA driver and device (cuda-python) BEFORE any TensorRT object: a runtime without a driver
     logs error 35 and then segfaults on deserialize;
  3. the GPU's SM against the sidecar's targets, and the plugin's kernel for that SM against the
     driver's CUDA version (a cubin of a newer major CUDA, or PTX of a newer ISA, is refused with
     the fix) and the GPU's shared memory per block; then the plugin is registered and the engine
     deserialized.
Running: device buffers and page-locked (pinned) host buffers are allocated once per input shape
and reused (freed on a new shape and on close): inputs are staged into the pinned buffers and
uploaded asynchronously, outputs come back into pinned buffers and are returned as copies; only
label ids (and instance ids) are uploaded (the one-hot lives in the engine); with `cuda_graph=True` the
execution for a fixed shape is captured once and replayed; if the capture fails, the capture is
ended, the graph dropped, and that engine runs without graphs from then on (one note, `notes`).
Threads: the driver's current context is per thread and only `__init__`'s thread has it set, so
every method that calls the driver pushes the engine's context and pops it in a `finally`
(`asap serve` calls engines from PyTriton's handler thread).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asap_deploy.errors import EngineError
from asap_deploy.export.stages import Stage

from .base import IMAGE, IMAGE_FLOAT, Engine
from .build import check_sidecar, read_sidecar, stage_graphs
from .engine_file import engine_name

ALIGN = 256  # bytes: device buffers are rounded up to this


def find_engine(bundle, graph: str, precision: str, flavor: str, engine_dir: Path | None = None) -> Path:
    """The engine file of `graph`, or EngineError with the command that builds it."""
    folder = Path(engine_dir) if engine_dir else bundle.path
    path = folder / engine_name(graph, precision, flavor)
    if not path.is_file():
        stage = Stage.from_graph(graph).cli
        raise EngineError(f"{path}: no {precision} {flavor} engine for the {graph} graph; build it with: asap build-engine "
                          f"{bundle.path} --flavor {flavor} --stage {stage}{' --fp16' if precision == 'fp16' else ''}")
    return path


def buffer_plan(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any]) -> dict[str, int]:
    """Bytes of each I/O tensor's device buffer (rounded up to ALIGN)."""
    out = {}
    for name, shape in shapes.items():
        if any(int(d) < 0 for d in shape):
            raise EngineError(f"tensor {name} has an unresolved shape {tuple(shape)}: set every input shape first")
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtypes[name]).itemsize
        out[name] = max(ALIGN, -(-n // ALIGN) * ALIGN)
    return out


def shape_key(feeds: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype.str) for k, v in feeds.items()))


def check_input_range(name: str, shape: tuple[int, ...], profile: dict) -> None:
    """EngineError when `shape` lies outside the engine's optimization profile for `name`."""
    p = profile.get("inputs", {}).get(name)
    if not p:
        return
    lo, hi = p["min"], p["max"]
    if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
        raise EngineError(f"input {name} of shape {tuple(shape)} is outside the engine's profile "
                          f"min {tuple(lo)} .. max {tuple(hi)}; rebuild with wider --min/--max")


PHASES = ("h2d_ms", "gpu_compute_ms", "d2h_ms")  # GPU-timed phases of `last_phases`, as trtexec splits latency
# What each figure of `last_phases` spans (also in `describe()` and the bench report).
PHASE_SPANS = {
    "h2d_ms": "GPU time of the input copies host->device from page-locked (pinned) host buffers (CUDA events "
              "around the copies; the host's copy into the pinned buffer is not in it)",
    "gpu_compute_ms": "GPU time from the end of the input copies to the end of the engine's work (CUDA events). "
                      "It also counts any time the GPU waited for the host to enqueue that work (execute_async_v3, "
                      "the plugin's Python enqueue; with CUDA graphs one cuGraphLaunch), so it is an upper bound of "
                      "trtexec's 'GPU Compute Time'",
    "d2h_ms": "GPU time of the output copies device->pinned host buffers (CUDA events; the copy out of the pinned "
              "buffer that the caller receives is not in it)",
    "enqueue_ms": "host wall time of the enqueue call alone (execute_async_v3 or cuGraphLaunch), as trtexec's "
                  "'Enqueue Time'",
}


def _drv():
    """cuda-python's driver module, as the plugin's launcher has it (MissingDependencyError without it)."""
    from asap_deploy.plugins.cuda_driver import driver

    return driver()


def _ck(result, what: str):
    from asap_deploy.plugins.cuda_driver import check

    return check(_drv(), result, what)


@contextmanager
def _current(ctx) -> Iterator[Any]:
    """`ctx` as the calling thread's current CUDA context for the block (pushed, popped in a
    `finally`; nesting is fine); yields the driver module."""
    drv = _drv()
    _ck(drv.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
    try:
        yield drv
    finally:
        drv.cuCtxPopCurrent()  # not checked: it must not hide the block's own exception


@dataclass
class _Bound:
    """Device buffers, pinned host buffers (and numpy views of them) for one input-shape signature
    (and its CUDA graph)."""

    ptrs: dict[str, int]
    sizes: dict[str, int]
    out_shapes: dict[str, tuple[int, ...]]
    host_ptrs: dict[str, int] = field(default_factory=dict)  # cuMemHostAlloc'd, one per I/O tensor
    host: dict[str, np.ndarray] = field(default_factory=dict)  # views of host_ptrs, the tensor's shape and dtype
    graph_exec: Any = None
    runs: int = 0


def _host_view(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A numpy array over `ptr` (page-locked host memory the engine owns)."""
    import ctypes

    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    buf = (ctypes.c_char * max(count * dtype.itemsize, 1)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class _GraphRunner:
    """One deserialized engine + execution context. `ctx`: the CUDA context, made current around
    every driver use; `note(key, text)`: how a one-time note reaches the engine's `notes`."""

    def __init__(self, trt, runtime, path: Path, sidecar: dict, blob: bytes, stream, cuda_graph: bool, ctx,
                 note: Callable[[str, str], None]):
        self.trt, self.path, self.sidecar, self.stream, self.cuda_graph = trt, path, sidecar, stream, cuda_graph
        self.ctx, self._note = ctx, note
        with _current(ctx):
            self._open(runtime, blob)

    def _open(self, runtime, blob: bytes) -> None:
        trt = self.trt
        self.engine = runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise EngineError(f"{self.path}: TensorRT could not deserialize it (see the log above); rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._bound: dict[tuple, _Bound] = {}
        # CUDA events around upload | compute | download: the phases of the last run, for bench
        self._events = [_ck(_drv().cuEventCreate(0), "cuEventCreate") for _ in range(4)]
        self.last_phases: dict[str, float] = {}

    def _bind(self, feeds: dict[str, np.ndarray]) -> _Bound:
        key = shape_key(feeds)
        if key in self._bound:
            return self._bound[key]
        for old in list(self._bound):  # one shape at a time: free the previous buffers
            self._free(self._bound.pop(old))
        for n in self.inputs:
            check_input_range(n, feeds[n].shape, self.sidecar.get("profile", {}))
            self.context.set_input_shape(n, tuple(feeds[n].shape))
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        shapes.update({n: tuple(self.context.get_tensor_shape(n)) for n in self.outputs})
        sizes = buffer_plan(shapes, self.dtypes)
        b = _Bound({}, sizes, {n: shapes[n] for n in self.outputs})
        try:
            for n in sizes:
                b.ptrs[n] = int(_ck(_drv().cuMemAlloc(sizes[n]), f"cuMemAlloc({n}, {sizes[n]} B)"))
                # page-locked host side: truly asynchronous copies, timed like trtexec's (not pageable ones)
                b.host_ptrs[n] = int(_ck(_drv().cuMemHostAlloc(sizes[n], 0), f"cuMemHostAlloc({n}, {sizes[n]} B)"))
                b.host[n] = _host_view(b.host_ptrs[n], shapes[n], self.dtypes[n])
        except BaseException:
            self._free(b)
            raise
        for n, p in b.ptrs.items():
            self.context.set_tensor_address(n, p)
        self._bound[key] = b
        return b

    def _free(self, b: _Bound) -> None:
        drv = _drv()
        if b.graph_exec is not None:
            drv.cuGraphExecDestroy(b.graph_exec)
        for p in b.ptrs.values():
            drv.cuMemFree(p)
        b.host.clear()  # the views die before their memory
        for p in b.host_ptrs.values():
            drv.cuMemFreeHost(p)
        b.ptrs, b.host_ptrs = {}, {}

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise EngineError(f"{self.path.name}: execute_async_v3 failed (see the TensorRT log)")

    def _capture(self, drv, b: _Bound) -> bool:
        """Capture one execution into `b.graph_exec`. On failure the capture is still ended (a stream
        left capturing fails every later call), the graph dropped, graphs turned off for this engine
        and a note given once; False then, and the caller runs plainly."""
        mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        graph = None
        try:
            _ck(drv.cuStreamBeginCapture(self.stream, mode), "cuStreamBeginCapture")
            try:
                self._execute()
            finally:
                ended = drv.cuStreamEndCapture(self.stream)
                if int(ended[0]) == int(drv.CUresult.CUDA_SUCCESS):
                    graph = ended[1]
            _ck(ended, "cuStreamEndCapture")  # e.g. a call in the enqueue that invalidated the capture
            b.graph_exec = _ck(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
            return True
        except Exception as exc:  # noqa: BLE001 - any capture failure: run without graphs instead
            b.graph_exec = None
            self.cuda_graph = False
            self._note("cuda_graph", f"{self.path.name}: CUDA graph capture failed ({exc}); running without "
                                     "CUDA graphs from now on")
            return False
        finally:
            if graph is not None:
                drv.cuGraphDestroy(graph)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with _current(self.ctx):
            return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        drv = _drv()
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise EngineError(f"{self.path.name}: inputs {missing} not given")
        feeds = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.inputs}
        b = self._bind(feeds)
        for n in self.inputs:  # host copy into the pinned staging buffer (not part of h2d_ms)
            np.copyto(b.host[n], feeds[n], casting="no")
        ev = self._events
        _ck(drv.cuEventRecord(ev[0], self.stream), "cuEventRecord")
        for n in self.inputs:
            _ck(drv.cuMemcpyHtoDAsync(b.ptrs[n], b.host_ptrs[n], b.host[n].nbytes, self.stream), f"upload {n}")
        _ck(drv.cuEventRecord(ev[1], self.stream), "cuEventRecord")
        # capture after one plain run (plugins initialise on first enqueue)
        t0 = time.perf_counter()
        if self.cuda_graph and b.runs >= 1 and (b.graph_exec is not None or self._capture(drv, b)):
            t0 = time.perf_counter()  # a capture is not an enqueue
            _ck(drv.cuGraphLaunch(b.graph_exec, self.stream), "cuGraphLaunch")
        else:
            self._execute()
        enqueue_ms = (time.perf_counter() - t0) * 1e3
        b.runs += 1
        _ck(drv.cuEventRecord(ev[2], self.stream), "cuEventRecord")
        for n in self.outputs:
            _ck(drv.cuMemcpyDtoHAsync(b.host_ptrs[n], b.ptrs[n], b.host[n].nbytes, self.stream), f"download {n}")
        _ck(drv.cuEventRecord(ev[3], self.stream), "cuEventRecord")
        _ck(drv.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
        self.last_phases = {name: float(_ck(drv.cuEventElapsedTime(ev[i], ev[i + 1]), "cuEventElapsedTime"))
                            for i, name in enumerate(PHASES)}
        self.last_phases["enqueue_ms"] = enqueue_ms
        return {n: b.host[n].copy() for n in self.outputs}  # copies: the pinned buffers serve the next call

    def close(self) -> None:
        with _current(self.ctx) as drv:
            for k in list(self._bound):
                self._free(self._bound.pop(k))
            for e in self._events:
                drv.cuEventDestroy(e)
        self._events = []
        self.context = None
        self.engine = None


class TensorRTEngine(Engine):
    """Engine interface over a bundle's TensorRT engines (one per graph, opened on first use)."""

    name = "tensorrt"

    def __init__(self, bundle, precision: str = "fp32", flavor: str | None = None, engine_dir: str | Path | None = None,
                 device: int = 0, cuda_graph: bool = False, graphs: tuple[str, ...] | None = None):
        super().__init__(bundle.config, precision)
        from asap_deploy.plugins import cuda_driver, trt_compat

        self.bundle, self.device, self.cuda_graph = bundle, device, cuda_graph
        self.flavor = trt_compat.check_flavor(flavor or trt_compat.default_flavor())
        self.engine_dir = Path(engine_dir) if engine_dir else None
        present = [g for g in stage_graphs("all")
                   if (Path(engine_dir or bundle.path) / engine_name(g, precision, self.flavor)).is_file()]
        wanted = tuple(graphs) if graphs else (tuple(present) or ("asap",))
        # 1. sidecars, without a GPU
        trt = trt_compat.import_trt(self.flavor)
        self._files: dict[str, tuple[Path, dict, bytes]] = {}
        for g in wanted:
            path = find_engine(bundle, g, precision, self.flavor, self.engine_dir)
            sc = read_sidecar(path)
            blob = path.read_bytes()
            check_sidecar(sc, blob, flavor=self.flavor, trt_version=trt_compat.trt_version(trt), bundle=bundle)
            if sc.get("precision") != precision or sc.get("graph") != g:
                raise EngineError(f"{path}: its sidecar says {sc.get('graph')} {sc.get('precision')}, not {g} {precision}")
            self._files[g] = (path, sc, blob)
        # 2. driver + device before any TensorRT object
        trt_compat.require_gpu("running a TensorRT engine")
        self.sm, self.gpu = cuda_driver.device_sm(device)
        driver_cuda, smem = cuda_driver.driver_version(), cuda_driver.device_shared_optin(device)
        for g, (_, sc, blob) in self._files.items():  # the GPU, and kernels its driver can load and it can fit
            check_sidecar(sc, sm=self.sm, driver_cuda=driver_cuda, shared_optin=smem)
        # 3. plugin, runtime, stream
        from asap_deploy.plugins import tensorrt as trt_plugin

        trt_plugin.register(trt)  # before deserializing: the engine's plugin layers need the creator
        self.trt = trt
        drv = _drv()
        dev = _ck(drv.cuDeviceGet(device), "cuDeviceGet")
        self._ctx = _ck(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _ck(drv.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
        self.stream = _ck(drv.cuStreamCreate(1), "cuStreamCreate")  # non-blocking: capturable
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runners: dict[str, _GraphRunner] = {}


    def runner(self, graph: str) -> _GraphRunner:
        if graph not in self._files:
            path = find_engine(self.bundle, graph, self.precision, self.flavor, self.engine_dir)
            raise EngineError(f"{path}: this TensorRTEngine was opened without the {graph} engine (graphs=...)")
        if graph not in self._runners:
            path, sc, blob = self._files[graph]
            self._runners[graph] = _GraphRunner(self.trt, self._runtime, path, sc, blob, self.stream, self.cuda_graph,
                                                 self._ctx, self._note_once)
        return self._runners[graph]

    def last_phases(self) -> dict[str, float]:
        """H2D / GPU compute / D2H (GPU time, CUDA events) and enqueue (host time) milliseconds of the
        last call, summed over its engines; PHASE_SPANS says what each spans."""
        out = dict.fromkeys((*PHASES, "enqueue_ms"), 0.0)
        for r in self._runners.values():
            for k, v in r.last_phases.items():
                out[k] += v
            r.last_phases = {}
        return out

    def describe(self) -> dict:
        return {**super().describe(), "flavor": self.flavor, "tensorrt": self.trt.__version__, "gpu": self.gpu,
                "sm": self.sm, "cuda_graph": self.cuda_graph, "engines": {g: str(p) for g, (p, _, _) in self._files.items()},
                "host_buffers": "pinned (cuMemHostAlloc), reused per input shape", "phases": dict(PHASE_SPANS),
                "notes": self.notes}

    def _feeds(self, graph: str, **arrays) -> dict[str, np.ndarray]:
        r = self.runner(graph)
        return {n: arrays[n] for n in r.inputs}

    def _generate(self, labels, instances):
        out = self.runner("asap").run(self._feeds("asap", labels=labels, instances=instances))
        return {IMAGE: out[IMAGE], IMAGE_FLOAT: out[IMAGE_FLOAT].astype(np.float32, copy=False)}

    def _predict_params(self, labels, instances):
        out = self.runner("predictor").run(self._feeds("predictor", labels=labels, instances=instances))
        return out["params"].astype(np.float32, copy=False)

    def _pixelwise(self, labels, params):
        out = self.runner("pixelwise").run(self._feeds("pixelwise", labels=labels, params=params))
        return {IMAGE: out[IMAGE], IMAGE_FLOAT: out[IMAGE_FLOAT].astype(np.float32, copy=False)}

    def close(self) -> None:
        for r in self._runners.values():
            r.close()
        self._runners.clear()
        if getattr(self, "stream", None) is not None:
            with _current(self._ctx) as drv:
                drv.cuStreamDestroy(self.stream)
            self.stream = None
