"""The TensorRT runner's driver use, on CPU: a fake cuda-python driver module that keeps the current
CUDA context per thread and each stream's capture state, and fake TensorRT engine objects, so the
runner's calls can be checked without a GPU. Covers: every public method that touches the driver
works from a thread that did not create the context (asap serve calls engines from PyTriton's
handler thread), and a failure inside CUDA graph capture leaves no stream capturing and falls back
to plain execution with one note."""

from __future__ import annotations

import ctypes
import enum
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from asap_deploy.engines import tensorrt as trt_engine
from asap_deploy.engines.base import IMAGE, IMAGE_FLOAT
from asap_deploy.errors import EngineError, KernelError
from asap_deploy.plugins import cuda_driver


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_ILLEGAL_STATE = 401
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901


OK = CUresult.CUDA_SUCCESS
NO_CTX = CUresult.CUDA_ERROR_INVALID_CONTEXT


class FakeDriver:
    """Records calls (name, thread); a per-thread context stack; streams that may be capturing.
    Calls that need a context return CUDA_ERROR_INVALID_CONTEXT when the calling thread has none."""

    CUresult = CUresult
    CUstreamCaptureMode = SimpleNamespace(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL=2)
    NO_CONTEXT_NEEDED = {"cuGetErrorName", "cuCtxPushCurrent", "cuCtxPopCurrent", "cuCtxSetCurrent",
                         "cuDeviceGet", "cuDevicePrimaryCtxRetain"}

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.stacks: dict[int, list[int]] = {}
        self.capturing: dict[int, bool] = {}  # stream -> capturing (False: capture invalidated)
        self.allocated: set[int] = set()
        self.device_mem: dict[int, bytearray] = {}  # device buffer -> its bytes (copies really move data)
        self.pinned: dict[int, object] = {}  # page-locked host buffer address -> its ctypes storage
        self.freed_host: list[object] = []
        self.copies: list[tuple[str, int, int, int]] = []  # (direction, host address, device buffer, bytes)
        self.events: set[int] = set()
        self.graphs: set[int] = set()
        self.execs: set[int] = set()
        self.streams: set[int] = set()
        self._next = 0x1000
        self.lock = threading.Lock()

    # ---- bookkeeping ------------------------------------------------------------------------
    def current(self) -> int | None:
        stack = self.stacks.get(threading.get_ident())
        return stack[-1] if stack else None

    def _handle(self) -> int:
        with self.lock:
            self._next += 0x100
            return self._next

    def _enter(self, name: str) -> bool:
        self.calls.append((name, threading.current_thread().name))
        return name in self.NO_CONTEXT_NEEDED or self.current() is not None

    def names(self, thread: str | None = None) -> list[str]:
        return [n for n, t in self.calls if thread is None or t == thread]

    def _stream_op(self, name: str, stream, capturable: bool):
        """(error or None) for an operation on `stream`: a non-capturable one invalidates a capture."""
        if not self._enter(name):
            return NO_CTX
        s = int(stream)
        if s in self.capturing and not capturable:
            self.capturing[s] = False
            return CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
        return None

    # ---- the driver API the runner uses -----------------------------------------------------
    def cuGetErrorName(self, err):
        self._enter("cuGetErrorName")
        return OK, CUresult(int(err)).name.encode()

    def cuDeviceGet(self, ordinal):
        self._enter("cuDeviceGet")
        return OK, ordinal

    def cuDevicePrimaryCtxRetain(self, dev):
        self._enter("cuDevicePrimaryCtxRetain")
        return OK, 0xC0

    def cuCtxSetCurrent(self, ctx):
        self._enter("cuCtxSetCurrent")
        stack = self.stacks.setdefault(threading.get_ident(), [])
        if stack:
            stack[-1] = int(ctx)
        else:
            stack.append(int(ctx))
        return (OK,)

    def cuCtxPushCurrent(self, ctx):
        self._enter("cuCtxPushCurrent")
        self.stacks.setdefault(threading.get_ident(), []).append(int(ctx))
        return (OK,)

    def cuCtxPopCurrent(self):
        self._enter("cuCtxPopCurrent")
        stack = self.stacks.get(threading.get_ident())
        if not stack:
            return NO_CTX, None
        return OK, stack.pop()

    def cuStreamCreate(self, flags):
        if not self._enter("cuStreamCreate"):
            return NO_CTX, None
        s = self._handle()
        self.streams.add(s)
        return OK, s

    def cuStreamDestroy(self, stream):
        if not self._enter("cuStreamDestroy"):
            return (NO_CTX,)
        self.streams.discard(int(stream))
        return (OK,)

    def cuEventCreate(self, flags):
        if not self._enter("cuEventCreate"):
            return NO_CTX, None
        e = self._handle()
        self.events.add(e)
        return OK, e

    def cuEventDestroy(self, event):
        if not self._enter("cuEventDestroy"):
            return (NO_CTX,)
        self.events.discard(int(event))
        return (OK,)

    def cuEventRecord(self, event, stream):
        return (self._stream_op("cuEventRecord", stream, capturable=True) or OK,)

    def cuEventElapsedTime(self, start, end):
        if not self._enter("cuEventElapsedTime"):
            return NO_CTX, None
        return OK, 0.5

    def cuMemAlloc(self, size):
        if not self._enter("cuMemAlloc"):
            return NO_CTX, None
        p = self._handle()
        self.allocated.add(p)
        self.device_mem[p] = bytearray(int(size))
        return OK, p

    def cuMemFree(self, ptr):
        if not self._enter("cuMemFree"):
            return (NO_CTX,)
        self.allocated.discard(int(ptr))
        self.device_mem.pop(int(ptr), None)
        return (OK,)

    def cuMemHostAlloc(self, size, flags):
        if not self._enter("cuMemHostAlloc"):
            return NO_CTX, None
        buf = ctypes.create_string_buffer(int(size))
        self.pinned[ctypes.addressof(buf)] = buf
        return OK, ctypes.addressof(buf)

    def cuMemFreeHost(self, ptr):
        if not self._enter("cuMemFreeHost"):
            return (NO_CTX,)
        buf = self.pinned.pop(int(ptr), None)
        if buf is None:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.freed_host.append(buf)  # kept: a new buffer never reuses a freed address (the test tells them apart)
        return (OK,)

    def cuMemcpyHtoDAsync(self, dst, src, nbytes, stream):
        err = self._stream_op("cuMemcpyHtoDAsync", stream, capturable=True)
        if err is None:
            self.copies.append(("h2d", int(src), int(dst), int(nbytes)))
            self.device_mem[int(dst)][:nbytes] = ctypes.string_at(int(src), nbytes)
        return (err or OK,)

    def cuMemcpyDtoHAsync(self, dst, src, nbytes, stream):
        err = self._stream_op("cuMemcpyDtoHAsync", stream, capturable=True)
        if err is None:
            self.copies.append(("d2h", int(dst), int(src), int(nbytes)))
            ctypes.memmove(int(dst), bytes(self.device_mem[int(src)][:nbytes]), nbytes)
        return (err or OK,)

    def cuStreamSynchronize(self, stream):
        return (self._stream_op("cuStreamSynchronize", stream, capturable=False) or OK,)

    def cuStreamBeginCapture(self, stream, mode):
        if not self._enter("cuStreamBeginCapture"):
            return (NO_CTX,)
        if int(stream) in self.capturing:
            return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
        self.capturing[int(stream)] = True
        return (OK,)

    def cuStreamEndCapture(self, stream):
        if not self._enter("cuStreamEndCapture"):
            return NO_CTX, None
        if int(stream) not in self.capturing:
            return CUresult.CUDA_ERROR_ILLEGAL_STATE, None
        valid = self.capturing.pop(int(stream))
        if not valid:
            return CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, None
        g = self._handle()
        self.graphs.add(g)
        return OK, g

    def cuGraphInstantiate(self, graph, flags):
        if not self._enter("cuGraphInstantiate"):
            return NO_CTX, None
        if int(graph) not in self.graphs:
            return CUresult.CUDA_ERROR_INVALID_VALUE, None
        x = self._handle()
        self.execs.add(x)
        return OK, x

    def cuGraphDestroy(self, graph):
        if not self._enter("cuGraphDestroy"):
            return (NO_CTX,)
        self.graphs.discard(int(graph))
        return (OK,)

    def cuGraphLaunch(self, graph_exec, stream):
        err = self._stream_op("cuGraphLaunch", stream, capturable=True)
        if err is None and int(graph_exec) not in self.execs:
            err = CUresult.CUDA_ERROR_INVALID_VALUE
        return (err or OK,)

    def cuGraphExecDestroy(self, graph_exec):
        if not self._enter("cuGraphExecDestroy"):
            return (NO_CTX,)
        self.execs.discard(int(graph_exec))
        return (OK,)


# ---- fake TensorRT objects: one engine "labels (uint8) -> image (uint8), image_float (fp16)" ----
class FakeTrt:
    __version__ = "0.fake"
    TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")

    @staticmethod
    def nptype(dt):
        return dt


class FakeContext:
    def __init__(self, drv: FakeDriver, fail_in_capture: bool):
        self.drv, self.fail_in_capture, self.shapes, self.addresses = drv, fail_in_capture, {}, {}
        self.executions: list[bool] = []  # True: enqueued while the stream was capturing

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name):
        n, h, w = self.shapes["labels"]
        return (n, h, w, 3)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream):
        if self.drv.current() is None:
            return False  # TensorRT without a current context: enqueue fails
        capturing = int(stream) in self.drv.capturing
        self.executions.append(capturing)
        # the "engine": every output byte = 1 + the first label id (so outputs follow the inputs)
        first = self.drv.device_mem[self.addresses["labels"]][0]
        for name in (IMAGE, IMAGE_FLOAT):
            mem = self.drv.device_mem[self.addresses[name]]
            mem[:] = bytes([(first + 1) % 256]) * len(mem)
        return not (capturing and self.fail_in_capture)


class FakeTrtEngine:
    IO = {"labels": ("input", np.uint8), IMAGE: ("output", np.uint8), IMAGE_FLOAT: ("output", np.float16)}

    def __init__(self, drv: FakeDriver, fail_in_capture: bool):
        self.drv, self.fail_in_capture, self.contexts = drv, fail_in_capture, []
        self.num_io_tensors = len(self.IO)

    def get_tensor_name(self, i):
        return list(self.IO)[i]

    def get_tensor_mode(self, name):
        return self.IO[name][0]

    def get_tensor_dtype(self, name):
        return self.IO[name][1]

    def create_execution_context(self):
        self.contexts.append(FakeContext(self.drv, self.fail_in_capture))
        return self.contexts[-1]


class FakeRuntime:
    def __init__(self, drv: FakeDriver, fail_in_capture: bool = False):
        self.drv, self.fail_in_capture, self.engines = drv, fail_in_capture, []

    def deserialize_cuda_engine(self, blob):
        if self.drv.current() is None:
            return None  # TensorRT needs a current context to deserialize
        self.engines.append(FakeTrtEngine(self.drv, self.fail_in_capture))
        return self.engines[-1]


@pytest.fixture
def drv(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(cuda_driver, "driver", lambda: fake)
    return fake


def make_engine(drv: FakeDriver, *, cuda_graph: bool = False, fail_in_capture: bool = False,
                graphs=("asap",)) -> trt_engine.TensorRTEngine:
    """A TensorRTEngine whose TensorRT parts are fakes, set up on the calling thread the way
    `__init__` does it (retain the primary context, make it current, create the stream)."""
    e = trt_engine.TensorRTEngine.__new__(trt_engine.TensorRTEngine)
    e.bundle, e.device, e.cuda_graph, e.precision, e.flavor = None, 0, cuda_graph, "fp32", "tensorrt"
    e.engine_dir, e.trt, e.sm, e.gpu = None, FakeTrt, 90, "fake"
    e._files = {g: (Path(f"/fake/{g}.fp32.tensorrt.engine"), {}, b"blob") for g in graphs}
    e._runtime = FakeRuntime(drv, fail_in_capture)
    e._runners = {}
    e._noted = {}
    dev = drv.cuDeviceGet(0)[1]
    e._ctx = drv.cuDevicePrimaryCtxRetain(dev)[1]
    drv.cuCtxSetCurrent(e._ctx)
    e.stream = drv.cuStreamCreate(1)[1]
    return e


def in_thread(fn, name="handler"):
    """fn() on a new thread (as PyTriton's handler thread calls the engine); its result or exception."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, name=name)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    return box["value"]


def labels(h=8, w=8):
    return np.zeros((1, h, w), np.uint8)


def test_run_from_another_thread_pushes_and_pops_the_context(drv):
    e = make_engine(drv)
    out = in_thread(lambda: e._generate(labels(), None))  # first use: deserialize + events + buffers + run
    assert out[IMAGE].shape == (1, 8, 8, 3) and out[IMAGE_FLOAT].dtype == np.float32
    again = in_thread(lambda: e._generate(labels(), None), name="handler2")
    assert again[IMAGE].shape == (1, 8, 8, 3)
    for thread in ("handler", "handler2"):
        names = drv.names(thread)
        assert names[0] == "cuCtxPushCurrent" and names[-1] == "cuCtxPopCurrent", names
        assert names.count("cuCtxPushCurrent") == names.count("cuCtxPopCurrent")
    assert e.runner("asap").last_phases  # the events worked from the handler thread
    # the handler threads leave no context behind; the creating thread still has its own
    assert drv.current() == e._ctx
    assert all(not stack for tid, stack in drv.stacks.items() if tid != threading.get_ident())


def test_run_on_a_handler_thread_after_opening_on_the_creating_thread(drv):
    e = make_engine(drv)
    r = e.runner("asap")  # opened where the context is current
    out = in_thread(lambda: r.run({"labels": labels()}))  # without a push: cuMemAlloc -> INVALID_CONTEXT
    assert out[IMAGE].shape == (1, 8, 8, 3)
    assert "cuCtxPushCurrent" in drv.names("handler") and not drv.capturing


def test_a_failing_run_still_pops_the_context(drv):
    e = make_engine(drv)
    e._files["asap"][1]["profile"] = {"inputs": {"labels": {"min": [1, 16, 16], "max": [1, 16, 16]}}}
    with pytest.raises(EngineError, match="outside the engine's profile"):
        in_thread(lambda: e._generate(labels(), None))
    names = drv.names("handler")
    assert names.count("cuCtxPushCurrent") == names.count("cuCtxPopCurrent") >= 1


def test_close_from_another_thread_pushes_and_pops_the_context(drv):
    e = make_engine(drv)
    e._generate(labels(), None)  # opened and run on the creating thread
    assert drv.allocated and drv.events and drv.streams
    in_thread(e.close, name="closer")
    names = drv.names("closer")
    assert names[0] == "cuCtxPushCurrent" and names[-1] == "cuCtxPopCurrent", names
    assert not drv.allocated and not drv.events and not drv.streams  # every free/destroy succeeded
    e.close()  # twice: nothing left to release


def test_graph_capture_from_another_thread(drv):
    e = make_engine(drv, cuda_graph=True)
    for i in range(3):
        in_thread(lambda: e._generate(labels(), None), name=f"h{i}")
    ctx = e.runner("asap").context
    assert ctx.executions == [False, True]  # a plain run, then the capture; the third run replays
    assert drv.names("h2").count("cuGraphLaunch") == 1 and "cuStreamBeginCapture" not in drv.names("h2")
    assert not drv.capturing and not e.notes


def test_failure_inside_capture_ends_it_and_falls_back_to_plain_execution_once(drv):
    e = make_engine(drv, cuda_graph=True, fail_in_capture=True)
    e._generate(labels(), None)  # plain first run (plugins initialise on first enqueue)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = e._generate(labels(), None)  # the capture fails inside _execute
        assert not drv.capturing, "the stream was left in capture mode"
        assert out[IMAGE].shape == (1, 8, 8, 3)
        for _ in range(2):
            e._generate(labels(), None)  # plain from now on, no new capture attempt
        e._generate(labels(16, 16), None)  # a new shape: no new capture either
    ctx = e.runner("asap").context
    assert ctx.executions == [False, True, False, False, False, False]
    assert drv.names().count("cuStreamBeginCapture") == 1 and "cuGraphLaunch" not in drv.names()
    assert not drv.graphs and not drv.execs  # nothing captured is kept
    assert len(e.notes) == 1 and "CUDA graph" in e.notes[0] and "asap.fp32.tensorrt.engine" in e.notes[0]
    said = [w for w in caught if "CUDA graph" in str(w.message)]
    assert len(said) == 1 and str(said[0].message) == e.notes[0]
    assert e.describe()["notes"] == e.notes


def test_capture_failure_is_noted_once_per_engine_across_graphs(drv):
    e = make_engine(drv, cuda_graph=True, fail_in_capture=True, graphs=("predictor", "pixelwise"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for g in ("predictor", "pixelwise"):
                e.runner(g).run({"labels": labels()})
    assert not drv.capturing and len(e.notes) == 1
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1


def test_invalidated_capture_ends_and_falls_back(drv, monkeypatch):
    """The capture itself breaks (the driver invalidates it): end capture returns an error, no graph."""
    e = make_engine(drv, cuda_graph=True)
    e._generate(labels(), None)
    r = e.runner("asap")
    plain = r._execute

    def execute_and_sync():  # something in the enqueue that cannot be captured
        plain()
        drv.cuStreamSynchronize(r.stream)

    monkeypatch.setattr(r, "_execute", execute_and_sync)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = e._generate(labels(), None)
        e._generate(labels(), None)
    assert out[IMAGE].shape == (1, 8, 8, 3) and not drv.capturing and not drv.execs
    assert len(e.notes) == 1 and "STREAM_CAPTURE_INVALIDATED" in e.notes[0]


def test_check_names_the_fake_error():
    fake = FakeDriver()
    with pytest.raises(KernelError, match="cuMemAlloc failed: CUDA_ERROR_INVALID_CONTEXT"):
        cuda_driver.check(fake, fake.cuMemAlloc(16), "cuMemAlloc")



# ---- issue 15, defect 8: pinned host buffers, reused per shape and freed; what each figure spans ----
def test_transfers_use_pinned_host_buffers_reused_per_shape_and_freed(drv):
    e = make_engine(drv)
    outs = []
    for first in (3, 7, 7):
        lab = labels()
        lab[0, 0, 0] = first
        outs.append(e._generate(lab, None))
    assert drv.names().count("cuMemHostAlloc") == 3  # labels, image, image_float: once for the shape
    assert drv.copies and all(host in drv.pinned for _, host, _, _ in drv.copies), "a copy used pageable memory"
    assert [d for d, *_ in drv.copies] == ["h2d", "d2h", "d2h"] * 3
    # outputs are copies of the pinned buffers: a later call does not change an earlier result
    assert int(outs[0][IMAGE][0, 0, 0, 0]) == 4 and int(outs[1][IMAGE][0, 0, 0, 0]) == 8
    assert not np.shares_memory(outs[1][IMAGE], outs[2][IMAGE])
    pinned_before = set(drv.pinned)
    e._generate(labels(16, 16), None)  # a new shape: the old pinned buffers are freed, new ones made
    assert drv.names().count("cuMemFreeHost") == 3 and not pinned_before & set(drv.pinned) and len(drv.pinned) == 3
    in_thread(e.close, name="closer")
    assert not drv.pinned and not drv.allocated  # everything freed, from another thread too
    assert drv.names("closer").count("cuMemFreeHost") == 3


def test_phases_say_what_they_span(drv):
    e = make_engine(drv)
    e._generate(labels(), None)
    phases = e.last_phases()
    assert set(phases) == {"h2d_ms", "gpu_compute_ms", "d2h_ms", "enqueue_ms"}
    assert set(phases) == set(trt_engine.PHASE_SPANS)
    assert "pinned" in trt_engine.PHASE_SPANS["h2d_ms"] and "enqueue" in trt_engine.PHASE_SPANS["gpu_compute_ms"]
    assert phases["h2d_ms"] == 0.5 and phases["enqueue_ms"] >= 0  # the fake events say 0.5 ms
